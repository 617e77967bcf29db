from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from slimexport.engines import onnx_export
from slimexport.engines.base import make_feeds
from slimexport.engines.onnx_export import DATA_FILE, MODEL_FILE, RESULT_FILE, export_unet_onnx, read_export
from slimexport.errors import ArtifactError, UsageError
from slimexport.verify.metrics import compare

FP32_REL = 1e-5  # fp32 noise: max |onnx - torch| relative to max |torch|

# (batch 2B, height, width) in latent cells: the traced shape, odd batches, a non-square size
SHAPES = [(2, 16, 16), (1, 16, 16), (3, 24, 32)]


def _ort(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _graph(result):
    return onnx.load(str(result.onnx_path), load_external_data=False)


@pytest.mark.parametrize("which", ["dense", "slim"])
@pytest.mark.parametrize("shape", SHAPES)
def test_onnx_matches_torch_fp32(which, shape, request, torch_reference):
    unet = request.getfixturevalue(f"{which}_unet")
    result = request.getfixturevalue(f"{which}_export")
    feeds = make_feeds(result.io_spec, *shape, seed=sum(shape))
    (out,) = _ort(result.onnx_path).run(None, feeds)
    ref = torch_reference(unet, feeds)
    assert out.shape == ref.shape == (shape[0], 4, shape[1], shape[2])
    assert np.abs(out - ref).max() <= FP32_REL * np.abs(ref).max()
    assert compare(out, ref, "fp32")["passed"]


def test_files_one_external_data_file(slim_export):
    folder = slim_export.folder
    assert sorted(p.name for p in folder.iterdir()) == sorted([MODEL_FILE, DATA_FILE, RESULT_FILE])
    model = _graph(slim_export)
    external = [t for t in model.graph.initializer if uses_external_data(t)]
    assert len(external) > 0
    assert {ExternalDataInfo(t).location for t in external} == {DATA_FILE}
    # every weight matrix is external; only small constants stay inline
    inline = [t for t in model.graph.initializer if not uses_external_data(t)]
    assert all(len(t.raw_data) < onnx_export.INLINE_BYTES for t in inline)
    end = max(ExternalDataInfo(t).offset + ExternalDataInfo(t).length for t in external)
    assert end <= slim_export.data_path.stat().st_size
    assert slim_export.size_bytes == slim_export.onnx_path.stat().st_size + slim_export.data_path.stat().st_size


def test_record_and_digests(slim_export):
    again = read_export(slim_export.folder, verify=True)
    assert again == slim_export
    rec = json.loads((slim_export.folder / RESULT_FILE).read_text())
    assert rec["onnx_path"] == MODEL_FILE and rec["opset"] == 19 and rec["export_seconds"] > 0
    assert rec["io_spec"]["dynamic_axes"]["sample"] == {"2B": 0, "H": 2, "W": 3}
    assert rec["io_spec"]["dynamic_axes"]["timestep"] == {"Bt": 0}
    assert rec["io_spec"]["inputs"][1] == {"name": "timestep", "dtype": "float32", "shape": ["Bt"], "sizes": {"Bt": [1, "2B"]}}


def test_read_export_detects_tampering(dense_unet, tmp_path):
    res = export_unet_onnx(dense_unet, tmp_path / "e")
    with open(res.data_path, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256"):
        read_export(res.folder, verify=True)


def test_io_names_dtypes_and_dynamic_axes(dense_export):
    model = _graph(dense_export)
    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    ins = {v.name: v for v in model.graph.input}
    assert list(ins) == ["sample", "timestep", "encoder_hidden_states"]
    assert dims(ins["sample"]) == ["2B", 4, "H", "W"]
    assert dims(ins["timestep"]) == ["Bt"]  # an axis of its own: TensorRT would hold a second "2B" equal to the first
    assert dims(ins["encoder_hidden_states"]) == ["2B", 77, 32]
    assert ins["timestep"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    (out,) = model.graph.output
    assert out.name == "latent" and dims(out) == ["2B", 4, "H", "W"]
    assert model.opset_import[0].version == 19


def test_standard_ops_and_attention_as_matmul_softmax(slim_export, slim_unet):
    model = _graph(slim_export)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = onnx_export.check_standard_ops(model)
    n_attn = sum(1 for m in slim_unet.modules() if type(m).__name__ == "Attention")
    assert ops["Softmax"] == n_attn
    assert not {"Attention", "MultiHeadAttention", "ATen", "PythonOp"} & set(ops)
    assert ops["MatMul"] >= 2 * n_attn  # QK^T and PV per attention, plus the projections
    onnx.checker.check_model(str(slim_export.onnx_path), full_check=True)


def test_slim_projection_shapes_in_graph(slim_export):
    """The slim layer's narrower q (8 per head) and v/o (4 per head) weights are in the graph."""
    model = _graph(slim_export)
    shapes = {tuple(t.dims) for t in model.graph.initializer}
    heads = 2
    assert (32, heads * 8) in shapes  # to_q / to_k as MatMul weights [in, out]
    assert (32, heads * 4) in shapes and (heads * 4, 32) in shapes  # to_v, to_out


def test_fp16_export_loads_and_runs(slim_export_fp16, slim_unet, torch_reference):
    res = slim_export_fp16
    dtypes = {e["name"]: e["dtype"] for e in res.io_spec["inputs"] + res.io_spec["outputs"]}
    assert dtypes == {"sample": "float16", "timestep": "float32", "encoder_hidden_states": "float16", "latent": "float16"}
    sess = _ort(res.onnx_path)
    for shape in [(2, 16, 16), (3, 24, 32)]:
        feeds = make_feeds(res.io_spec, *shape, seed=3)
        (out,) = sess.run(None, feeds)
        assert out.dtype == np.float16 and np.isfinite(out).all()
        ref = torch_reference(slim_unet, feeds)
        m = compare(out, ref, "fp16")
        assert m["passed"], m["reason"]


@pytest.mark.parametrize("which, dtype", [("dense", "fp32"), ("slim", "fp16")])
def test_one_timestep_or_one_per_row(which, dtype, request, torch_reference):
    """diffusers' ONNX pipelines and the TensorRT demo pass timestep [1]; samplers in batch pass [2B]. Both run,
    agree with each other and with PyTorch."""
    unet = request.getfixturevalue(f"{which}_unet")
    res = request.getfixturevalue(f"{which}_export" + ("_fp16" if dtype == "fp16" else ""))
    sess = _ort(res.onnx_path)
    feeds = make_feeds(res.io_spec, 3, 16, 24, seed=4)
    one = dict(feeds, timestep=np.array([981.0], np.float32))
    per_row = dict(feeds, timestep=np.full(3, 981.0, np.float32))
    (a,), (b,) = sess.run(None, one), sess.run(None, per_row)
    assert a.shape == b.shape == (3, 4, 16, 24)
    assert compare(a, b, dtype)["passed"]
    assert compare(a, torch_reference(unet, per_row), dtype)["passed"]
    if dtype == "fp32":
        ref = torch_reference(unet, one)  # diffusers broadcasts a [1] timestep itself
        assert np.abs(a - ref).max() <= FP32_REL * np.abs(ref).max()


def test_timestep_in_the_sample_dtype(slim_unet, tmp_path, torch_reference):
    """``timestep_dtype="sample"``: the fp16 graph takes an fp16 timestep (the TensorRT demo's convention)."""
    res = export_unet_onnx(slim_unet, tmp_path / "t16", dtype="fp16", timestep_dtype="sample")
    entry = res.io_spec["inputs"][1]
    assert entry["dtype"] == "float16" and entry["shape"] == ["Bt"]
    ins = {v.name: v for v in _graph(res).graph.input}
    assert ins["timestep"].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    sess = _ort(res.onnx_path)
    feeds = make_feeds(res.io_spec, 2, 16, 16, seed=6)
    for ts in (np.array([981.0], np.float16), np.full(2, 981.0, np.float16)):
        (out,) = sess.run(None, dict(feeds, timestep=ts))
        assert compare(out, torch_reference(slim_unet, dict(feeds, timestep=ts.astype(np.float32))), "fp16")["passed"]


def test_fp16_norms_run_in_fp32(slim_export_fp16):
    model = onnx.load(str(slim_export_fp16.onnx_path), load_external_data=False)
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    norms = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "LayerNormalization")]
    assert norms
    for n in norms:
        assert types[n.input[0]] == onnx.TensorProto.FLOAT, n.name
        assert types[n.output[0]] == onnx.TensorProto.FLOAT, n.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in convs)


def test_fp16_export_leaves_caller_model_alone(slim_unet, slim_export_fp16):
    assert all(p.dtype == torch.float32 for p in slim_unet.parameters())
    assert not any(type(m).__name__ == "Fp32Norm" for m in slim_unet.modules())


def test_out_sample_name_and_trace_shape(dense_unet, tmp_path, torch_reference):
    res = export_unet_onnx(dense_unet, tmp_path / "o", output_name="out_sample", opset=17,
                           sample_shape=(1, 4, 8, 8), context_shape=(1, 77, 32))
    assert [e["name"] for e in res.io_spec["outputs"]] == ["out_sample"]
    feeds = make_feeds(res.io_spec, 2, 16, 24, seed=5)
    sess = _ort(res.onnx_path)
    assert [o.name for o in sess.get_outputs()] == ["out_sample"]
    (out,) = sess.run(None, feeds)
    ref = torch_reference(dense_unet, feeds)
    assert np.abs(out - ref).max() <= FP32_REL * np.abs(ref).max()


@pytest.mark.parametrize("kwargs, match", [
    ({"opset": 16}, "opset"),
    ({"dtype": "bf16"}, "dtype"),
    ({"output_name": "noise"}, "output_name"),
    ({"sample_shape": (2, 4, 15, 16)}, "sample_shape"),  # tiny downsamples by 2
    ({"sample_shape": (2, 3, 16, 16)}, "sample_shape"),
    ({"context_shape": (2, 77, 64)}, "context_shape"),
    ({"timestep_dtype": "float16"}, "timestep_dtype"),
])
def test_bad_arguments(dense_unet, tmp_path, kwargs, match):
    with pytest.raises(UsageError, match=match):
        export_unet_onnx(dense_unet, tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()


def test_failed_export_keeps_previous_folder(dense_unet, dense_export, tmp_path, monkeypatch):
    import shutil

    target = tmp_path / "keep"
    shutil.copytree(dense_export.folder, target)

    def boom(model, weights_dir):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(onnx_export, "_graph_passes", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_unet_onnx(dense_unet, target)
    assert read_export(target, verify=True).onnx_sha256 == dense_export.onnx_sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no temporary folder left behind


def test_large_model_path_streams_external_weights(dense_unet, tmp_path, torch_reference):
    """Over 2 GB the exporter writes one file per tensor; folding must still work and the writer must stream
    them into one file. Simulated on tiny by re-saving its raw export with one file per tensor."""
    from slimexport.engines.base import io_spec_for_unet
    from slimexport.engines.torch_runner import UNetIO

    spec = io_spec_for_unet(dense_unet)
    args = (torch.randn(2, 4, 16, 16), torch.full((2,), 999.0), torch.randn(2, 77, 32))
    (tmp_path / "t").mkdir()
    onnx_export._trace_to_onnx(UNetIO(dense_unet), args, tmp_path / "t" / MODEL_FILE, 19, spec)
    raw = tmp_path / "raw"
    raw.mkdir()
    onnx.save_model(onnx.load(str(tmp_path / "t" / MODEL_FILE)), str(raw / MODEL_FILE), save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert len(list(raw.iterdir())) > 10
    model = onnx.load(str(raw / MODEL_FILE), load_external_data=False)
    assert all(not t.HasField("raw_data") for t in model.graph.initializer)
    assert onnx_export.static_nodes(model)  # something to fold (Identity of deduplicated norm weights, ...)
    model = onnx_export._graph_passes(model, raw)
    assert onnx_export.static_nodes(model) == []  # everything foldable was folded
    n_in_memory = sum(t.HasField("raw_data") and len(t.raw_data) >= onnx_export.INLINE_BYTES for t in model.graph.initializer)
    assert n_in_memory < len(model.graph.initializer) // 4  # the big weights stayed on disk
    out = tmp_path / "out"
    out.mkdir()
    onnx_export._write_weights(model, raw, out)
    onnx.save_model(model, str(out / MODEL_FILE))
    assert sorted(p.name for p in out.iterdir()) == [MODEL_FILE, DATA_FILE]
    onnx.checker.check_model(str(out / MODEL_FILE), full_check=True)
    feeds = make_feeds(spec, 2, 16, 16, seed=9)
    (got,) = _ort(out / MODEL_FILE).run(None, feeds)
    ref = torch_reference(dense_unet, feeds)
    assert np.abs(got - ref).max() <= FP32_REL * np.abs(ref).max()


def test_exports_are_fully_folded(dense_export, slim_export_fp16):
    for res in (dense_export, slim_export_fp16):
        assert onnx_export.static_nodes(_graph(res)) == []


def test_check_standard_ops_rejects_custom_domain():
    from onnx import helper

    node = helper.make_node("MyAttention", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    with pytest.raises(ArtifactError, match="com.example::MyAttention"):
        onnx_export.check_standard_ops(helper.make_model(graph))
