import pytest
import torch

from slimexport.slim.apply import load_slim_unet, save_slim_unet, shapes_of
from slimexport.slim.attention import SlimAttnProcessor


def _explicit_attention(x, ctx, wq, wk, wv, wo, bo, heads, scale):
    """softmax(q_h k_hᵀ · scale) v_h per head, heads concatenated, then the output projection (by hand)."""
    outs = []
    rq, rv = wq.shape[0] // heads, wv.shape[0] // heads
    q, k, v = x @ wq.T, ctx @ wk.T, ctx @ wv.T
    for h in range(heads):
        qh, kh, vh = q[..., h * rq:(h + 1) * rq], k[..., h * rq:(h + 1) * rq], v[..., h * rv:(h + 1) * rv]
        logits = torch.einsum("bnr,bsr->bns", qh, kh) * scale
        p = torch.exp(logits - logits.amax(-1, keepdim=True))
        outs.append(torch.einsum("bns,bsr->bnr", p / p.sum(-1, keepdim=True), vh))
    return torch.cat(outs, -1) @ wo.T + bo


@pytest.mark.parametrize("kernel", [None, "auto"])
@pytest.mark.parametrize("cross", [False, True])
def test_sdpa_decoupled_head_sizes(kernel, cross):
    """SlimAttnProcessor on a diffusers Attention whose q/k per-head size (8) differs from its v/o size (4) and from
    the dense head size (16), whose scale it keeps: the explicit softmax formula."""
    from diffusers.models.attention_processor import Attention

    heads, width, ctx_dim, dense_head, rq, rv = 2, 32, 24, 16, 8, 4
    g = torch.Generator().manual_seed(0)
    attn = Attention(query_dim=width, cross_attention_dim=ctx_dim if cross else None, heads=heads, dim_head=dense_head).eval()
    kv_in = ctx_dim if cross else width
    wq, wk = torch.randn(heads * rq, width, generator=g) / 4, torch.randn(heads * rq, kv_in, generator=g) / 4
    wv, wo = torch.randn(heads * rv, kv_in, generator=g), torch.randn(width, heads * rv, generator=g)
    bo = torch.randn(width, generator=g)
    attn.to_q, attn.to_k, attn.to_v = (torch.nn.Linear(w.shape[1], w.shape[0], bias=False) for w in (wq, wk, wv))
    attn.to_out[0] = torch.nn.Linear(heads * rv, width)
    with torch.no_grad():
        for lin, w in ((attn.to_q, wq), (attn.to_k, wk), (attn.to_v, wv), (attn.to_out[0], wo)):
            lin.weight.copy_(w)
        attn.to_out[0].bias.copy_(bo)
    proc_kernel = None
    if kernel == "auto":
        from slimexport.slim.apply import default_attention_kernel

        proc_kernel = default_attention_kernel()
    attn.set_processor(SlimAttnProcessor(attn.scale, kernel=proc_kernel))
    assert attn.scale == pytest.approx(dense_head ** -0.5)
    x = torch.randn(2, 10, width, generator=g)
    ctx = torch.randn(2, 7, ctx_dim, generator=g) if cross else x
    with torch.no_grad():
        out = attn(x, encoder_hidden_states=ctx if cross else None)
        want = _explicit_attention(x, ctx, wq, wk, wv, wo, bo, heads, dense_head ** -0.5)
        wrong_scale = _explicit_attention(x, ctx, wq, wk, wv, wo, bo, heads, rq ** -0.5)
    assert out.shape == (2, 10, width)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, wrong_scale, atol=1e-3)  # the scale is the dense layer's, not r_qk's


def test_save_load_roundtrip_identical_outputs(slim_tiny, tiny_inputs, tmp_path):
    unet, _ = slim_tiny
    save_slim_unet(unet, tmp_path / "slim")
    back = load_slim_unet(tmp_path / "slim")
    assert shapes_of(back) == shapes_of(unet)
    x, ctx, ts = tiny_inputs
    for t in ts:
        tt = torch.full((4,), t)
        assert torch.equal(back(x, tt, ctx).sample, unet(x, tt, ctx).sample)
    procs = {type(p) for p in back.attn_processors.values()}
    assert procs == {SlimAttnProcessor}


def test_slim_unet_generates_in_stable_diffusion_pipeline(tiny, slim_tiny):
    unet, _ = slim_tiny

    def generate(model, seed):
        pipe = tiny.pipeline()
        pipe.unet = model
        return pipe(["a cat on a sofa"], num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images

    out = generate(unet, 0)
    assert out.shape == (1, 32, 32, 3)
    assert bool(torch.isfinite(torch.from_numpy(out)).all())
    slim, dense, other_seed = (torch.from_numpy(a) for a in (out, generate(tiny.unet, 0), generate(tiny.unet, 1)))
    # the slim UNet changes the image a little (it is not the dense one), far less than another seed does (about 0.007
    # vs 0.16 here; with every attention output zeroed the change is 0.02)
    diff = float((slim - dense).abs().mean())
    assert 1e-4 < diff < 0.015
    assert diff < 0.1 * float((other_seed - dense).abs().mean())


def test_corrupted_weights_are_detected(slim_tiny, tmp_path):
    from slimexport.errors import ArtifactError

    unet, _ = slim_tiny
    d = save_slim_unet(unet, tmp_path / "slim")
    f = d / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_slim_unet(d)


def test_a_missing_or_dense_folder_says_what_it_is(tmp_path):
    from slimexport.errors import UsageError
    from slimexport.models.load import build_unet
    from slimexport.models.registry import TINY_UNET

    with pytest.raises(UsageError, match="does not exist"):
        load_slim_unet(tmp_path / "nope")
    build_unet(TINY_UNET, seed=0).save_pretrained(tmp_path / "dense", safe_serialization=True)
    with pytest.raises(UsageError, match="without slim_plan.json, not a slim one.*UNet2DConditionModel.from_pretrained"):
        load_slim_unet(tmp_path / "dense")


def test_a_changed_weight_survives_save_and_load(slim_tiny, tmp_path):
    """load → change a weight → save_slim_unet → load gives the changed weight (checked against its new sha256)."""
    import slimexport
    from slimexport.slim.apply import read_slim_plan

    unet, _ = slim_tiny
    first = save_slim_unet(unet, tmp_path / "slim", plan={"model": "tiny"})
    loaded = slimexport.load_slim_unet(first)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    with torch.no_grad():
        loaded.get_submodule(name.rsplit(".", 1)[0]).weight[0, 0] += 1.0
    changed = loaded.state_dict()[name].clone()
    assert slimexport.save_slim_unet(loaded, tmp_path / "again") == tmp_path / "again"  # public, from the top level
    back = load_slim_unet(tmp_path / "again")  # sha256 checked against the new plan
    assert torch.equal(back.state_dict()[name], changed) and not torch.equal(back.state_dict()[name], unet.state_dict()[name])
    assert shapes_of(back) == shapes_of(unet)
    assert read_slim_plan(tmp_path / "again")["weights"]["sha256"] != read_slim_plan(first)["weights"]["sha256"]
    save_slim_unet(back, first)  # a slim UNet folder is replaced
    assert torch.equal(load_slim_unet(first).state_dict()[name], changed)


def test_save_refuses_to_replace_other_folders(slim_tiny, tmp_path):
    from slimexport.errors import UsageError

    unet, _ = slim_tiny
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me\n")
    with pytest.raises(UsageError, match="a folder of other files"):
        save_slim_unet(unet, mine)
    assert (mine / "notes.txt").read_text() == "keep me\n"
    build = tmp_path / "build"
    save_slim_unet(unet, build / "slim_unet")  # what compress does: the slim_unet/ of its output folder
    (build / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="slimexport output folder.*save to a new folder"):
        save_slim_unet(unet, build)
    assert (build / "manifest.json").exists() and (build / "slim_unet" / "slim_plan.json").exists()


def test_load_takes_the_compress_or_build_folder(slim_tiny, tmp_path):
    """The folder `compress --out DIR` writes (manifest.json, slim_unet/) loads like its slim_unet/."""
    unet, _ = slim_tiny
    out = tmp_path / "out"
    save_slim_unet(unet, out / "slim_unet")
    (out / "manifest.json").write_text("{}")
    a, b = load_slim_unet(out), load_slim_unet(out / "slim_unet")
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


@pytest.mark.parametrize("remove, missing", [
    ("slim_unet", "slim_unet does not exist"),
    ("slim_unet/slim_plan.json", "slim_unet is missing slim_plan.json"),
    ("slim_unet/diffusion_pytorch_model.safetensors", "slim_unet is missing diffusion_pytorch_model.safetensors"),
])
def test_an_incomplete_output_folder_names_the_folder_to_rerun(slim_tiny, tmp_path, remove, missing):
    import shutil

    from slimexport.errors import ArtifactError

    unet, _ = slim_tiny
    out = tmp_path / "out"
    save_slim_unet(unet, out / "slim_unet")
    (out / "manifest.json").write_text("{}")
    target = out / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    for path in (out, out / "slim_unet"):
        with pytest.raises(ArtifactError) as err:
            load_slim_unet(path)
        assert missing in err.value.message and "with the same --out" in err.value.fix and str(out) in err.value.fix


def test_a_folder_without_a_slim_unet_says_which_folder_to_pass(tmp_path):
    from slimexport.errors import ArtifactError, UsageError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="holds no slim UNet") as err:
        load_slim_unet(tmp_path / "empty")
    assert "compress --out" in err.value.fix and "rebuild" not in str(err.value)
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    with pytest.raises(UsageError, match="pipeline folder, not a slim UNet"):
        load_slim_unet(tmp_path / "pipe")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        load_slim_unet(tmp_path / "f.txt")
