"""The pipeline folder loads in diffusers' ONNX pipeline (and Optimum's, where it installs) and generates the image
the torch pipeline running the slim UNet generates: for ``tiny`` and for a diffusers-saved SD2-style pipeline."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from slimexport.engines.onnx_export import RESULT_FILE, export_unet_onnx
from slimexport.engines.pipeline_folder import (
    PARTS,
    RECORD_FILE,
    read_pipeline_folder,
    write_pipeline_folder,
)
from slimexport.errors import ArtifactError, UsageError
from slimexport.models import load_model
from slimexport.models.build import build_unet, build_vae, char_tokenizer
from slimexport.models.registry import TINY_UNET, TINY_VAE

diffusers = pytest.importorskip("diffusers")
if not hasattr(diffusers, "OnnxStableDiffusionPipeline"):
    pytest.skip("this diffusers has no OnnxStableDiffusionPipeline (removed after 0.42)", allow_module_level=True)

PROMPT = "a red fox in the snow"
STEPS, GUIDANCE = 3, 7.5
# Images are in [0, 1]. Every part runs in fp32 on both sides, so they differ by float rounding only (1.7e-6 seen on a
# 2-core AMD EPYC, 2026-12-02): 1e-3, a quarter of one 8-bit level, leaves room for other CPUs' kernels.
IMAGE_ATOL = 1e-3
IMAGE_ATOL_FP16 = 1e-2  # fp16 parts against the fp32 torch pipeline: 2.5 8-bit levels
# The dense UNet's image differs from the slim one's by ~0.1 here: the folder must hold the slim UNet, not the dense.
DENSE_MIN_DIFF = 20 * IMAGE_ATOL

# Stable Diffusion 2.1 base's scheduler_config.json (PNDM, epsilon prediction).
SD2_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                 "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
                 "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


@dataclass
class Case:
    bundle: object
    slim: torch.nn.Module
    folder: Path


def _slim(bundle, stats):
    from slimexport.allocate.api import plan_ranks
    from slimexport.config import AllocConfig, DecomposeConfig
    from slimexport.decompose.api import slim_unet

    plan = plan_ranks(bundle.unet, stats, DecomposeConfig(), AllocConfig(budget=0.6))
    return slim_unet(bundle.unet, stats, plan, DecomposeConfig(), progress=False)[0].eval()


@pytest.fixture(scope="module")
def tiny_case(tiny, slim_unet, slim_export, tmp_path_factory):
    """``tiny`` with the engine tests' slim UNet (made from tiny's dense UNet) and its export, whose output is
    ``latent``: renamed to ``out_sample`` in the folder."""
    folder = tmp_path_factory.mktemp("tiny-pipeline") / "pipeline"
    write_pipeline_folder(tiny, slim_export.folder, folder)
    return Case(tiny, slim_unet, folder)


def _save_sd2_style(path: Path) -> None:
    """A tiny pipeline shaped like SD 2.x, saved by diffusers: linear proj_in/out, per-level head counts, an
    OpenCLIP-like text encoder (gelu, padding with "!") and SD 2.1 base's PNDM scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = build_unet({**TINY_UNET, "use_linear_projection": True, "attention_head_dim": [2, 4]}, seed=3)
    tokenizer = char_tokenizer()
    tokenizer.pad_token = "!"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=77, hidden_act="gelu", projection_dim=32,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )).eval()
    pipe = StableDiffusionPipeline(vae=build_vae({**TINY_VAE, "sample_size": 32}, seed=5), text_encoder=text_encoder,
                                   tokenizer=tokenizer, unet=unet, scheduler=PNDMScheduler.from_config(SD2_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))


@pytest.fixture(scope="module")
def sd2_case(tmp_path_factory):
    from slimexport.calibrate import calibrate, select_prompts
    from slimexport.config import CalibConfig

    root = tmp_path_factory.mktemp("sd2-pipeline")
    _save_sd2_style(root / "sd2")
    bundle = load_model(str(root / "sd2"))
    cfg = CalibConfig(num_prompts=2, num_steps=2, num_bins=1, batch_size=2)
    slim = _slim(bundle, calibrate(bundle, select_prompts(bundle, cfg), cfg, progress=False))
    export_unet_onnx(slim, root / "onnx", output_name="out_sample")
    write_pipeline_folder(bundle, root / "onnx", root / "pipeline")
    return Case(bundle, slim, root / "pipeline")


def _latents(case: Case) -> np.ndarray:
    h, w = case.bundle.latent_size()
    return np.random.default_rng(0).standard_normal((1, case.bundle.unet.config.in_channels, h, w)).astype(np.float32)


def _onnx_pipeline(folder: Path):
    # provider_options={}: without it diffusers passes [] beside the provider, which ONNX Runtime >= 1.2x refuses
    # ("EP Error") before falling back to the CPU
    pipe = diffusers.OnnxStableDiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider",
                                                                  provider_options={})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _torch_image(case: Case, unet, scheduler, latents: np.ndarray) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    c = case.bundle.components
    pipe = StableDiffusionPipeline(vae=c["vae"], text_encoder=c["text_encoder"], tokenizer=c["tokenizer"], unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    h, w = case.bundle.image_size
    return pipe(PROMPT, height=h, width=w, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                latents=torch.from_numpy(latents), output_type="np").images


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_case", "sd2_case"])
def test_diffusers_onnx_pipeline_matches_torch(which, request):
    case = request.getfixturevalue(which)
    latents = _latents(case)
    pipe = _onnx_pipeline(case.folder)
    # diffusers' ONNX pipeline assumes 8 pixels per latent cell (SD's VAE); the tiny VAEs have 2: ask for the
    # pixel size that gives these latents
    h, w = latents.shape[2] * 8, latents.shape[3] * 8
    image = pipe(PROMPT, height=h, width=w, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=latents,
                 output_type="np").images
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref = _torch_image(case, case.slim, scheduler, latents)
    assert image.shape == ref.shape == (1, *case.bundle.image_size, 3)
    assert np.isfinite(image).all()
    assert np.abs(image - ref).max() <= IMAGE_ATOL
    dense = _torch_image(case, case.bundle.unet, type(scheduler).from_config(scheduler.config), latents)
    assert np.abs(image - dense).max() >= DENSE_MIN_DIFF


@pytest.mark.slow
def test_fp16_folder(tiny, slim_unet, slim_export_fp16, tmp_path):
    """An fp16 UNet export makes an fp16 folder (norms in fp32): fp16 I/O but int32 ids, and an image within
    IMAGE_ATOL_FP16 of the fp32 torch pipeline (9.6e-4 seen on the 2-core CPU, 2026-12-02)."""
    rec = write_pipeline_folder(tiny, slim_export_fp16.folder, tmp_path / "pipeline")
    dtypes = {(p, e["name"]): e["dtype"] for p, v in rec.parts.items() for e in v["inputs"] + v["outputs"]}
    assert dtypes.pop(("text_encoder", "input_ids")) == "int32"
    assert dtypes.pop(("unet", "timestep")) == "float32"
    assert set(dtypes.values()) == {"float16"}
    case = Case(tiny, slim_unet, tmp_path / "pipeline")
    latents = _latents(case)
    pipe = _onnx_pipeline(case.folder)
    image = pipe(PROMPT, height=latents.shape[2] * 8, width=latents.shape[3] * 8, num_inference_steps=STEPS,
                 guidance_scale=GUIDANCE, latents=latents.astype(np.float16), output_type="np").images
    ref = _torch_image(case, slim_unet, type(pipe.scheduler).from_config(pipe.scheduler.config), latents)
    assert image.dtype == np.float16 and np.isfinite(image).all()
    assert np.abs(image.astype(np.float32) - ref).max() <= IMAGE_ATOL_FP16


@pytest.mark.slow
@pytest.mark.parametrize("which", ["tiny_case", "sd2_case"])
def test_optimum_pipeline_matches_torch(which, request):
    optimum_ort = pytest.importorskip("optimum.onnxruntime", reason="Optimum's ONNX Runtime pipelines not installed")
    case = request.getfixturevalue(which)
    latents = _latents(case)
    pipe = optimum_ort.ORTStableDiffusionPipeline.from_pretrained(str(case.folder), provider="CPUExecutionProvider")
    h, w = case.bundle.image_size
    image = pipe(PROMPT, height=h, width=w, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                 latents=torch.from_numpy(latents), output_type="np").images
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    ref = _torch_image(case, case.slim, scheduler, latents)
    assert np.abs(np.asarray(image) - ref).max() <= IMAGE_ATOL


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_layout_and_io_names(tiny_case):
    folder = tiny_case.folder
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "OnnxStableDiffusionPipeline"
    assert {k: index[k] for k in PARTS} == {k: ["diffusers", "OnnxRuntimeModel"] for k in PARTS}
    assert index["tokenizer"][0] == "transformers" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    for part in PARTS:  # Optimum needs a config.json beside each model.onnx
        assert {p.name for p in (folder / part).iterdir()} == {"model.onnx", "model.onnx_data", "config.json"}
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}

    def io(part):
        s = _session(folder / part / "model.onnx")
        return ({i.name: i.type for i in s.get_inputs()}, [o.name for o in s.get_outputs()])

    assert io("text_encoder") == ({"input_ids": "tensor(int32)"}, ["last_hidden_state", "pooler_output"])
    assert io("unet") == ({"sample": "tensor(float)", "timestep": "tensor(float)",
                           "encoder_hidden_states": "tensor(float)"}, ["out_sample"])
    assert io("vae_encoder") == ({"sample": "tensor(float)"}, ["latent_sample"])
    assert io("vae_decoder") == ({"latent_sample": "tensor(float)"}, ["sample"])
    # diffusers' own loader picks the ONNX pipeline from model_index.json
    assert type(diffusers.DiffusionPipeline.from_pretrained(str(folder), provider="CPUExecutionProvider",
                                                            provider_options={})).__name__ == "OnnxStableDiffusionPipeline"


def test_vae_encoder_gives_the_posterior_mean(tiny_case):
    vae = tiny_case.bundle.components["vae"]
    image = np.random.default_rng(1).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)  # not the traced size
    (got,) = _session(tiny_case.folder / "vae_encoder" / "model.onnx").run(None, {"sample": image})
    with torch.no_grad():
        want = vae.encode(torch.from_numpy(image)).latent_dist.mean.numpy()
    assert got.shape == want.shape == (2, 4, 12, 20)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_record_and_verify(tiny_case, tmp_path):
    rec = read_pipeline_folder(tiny_case.folder, verify=True)
    assert (rec.model, rec.dtype, rec.opset, rec.scheduler) == ("tiny", "fp32", 19, "DDIMScheduler")
    assert set(rec.parts) == set(PARTS)
    assert rec.parts["unet"]["outputs"][0]["name"] == "out_sample"
    copy = tmp_path / "pipeline"
    shutil.copytree(tiny_case.folder, copy)
    with open(copy / "vae_decoder" / "model.onnx_data", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ArtifactError, match="vae_decoder"):
        read_pipeline_folder(copy, verify=True)
    (copy / RECORD_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        read_pipeline_folder(copy)


def test_sd2_keeps_its_scheduler_and_configs(sd2_case):
    folder = sd2_case.folder
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "PNDMScheduler"
    assert json.loads((folder / "unet" / "config.json").read_text())["use_linear_projection"] is True
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["hidden_act"] == "gelu"
    assert json.loads((folder / "vae_decoder" / "config.json").read_text())["scaling_factor"] == pytest.approx(0.18215)


def test_refuses_a_model_without_vae(tmp_path):
    digits = load_model("digits")
    with pytest.raises(UsageError, match="needs a text-to-image pipeline with a CLIP text encoder and a VAE") as err:
        write_pipeline_folder(digits, tmp_path / "onnx", tmp_path / "pipeline")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "pipeline").exists()


def test_refuses_another_dtype_and_an_old_timestep_axis(tiny_case, slim_export, tmp_path):
    onnx_dir = slim_export.folder
    with pytest.raises(UsageError, match="differs from the slim UNet export's"):
        write_pipeline_folder(tiny_case.bundle, onnx_dir, tmp_path / "pipeline", dtype="fp16")
    old = tmp_path / "old"
    shutil.copytree(onnx_dir, old)
    record = json.loads((old / RESULT_FILE).read_text())
    timestep = next(e for e in record["io_spec"]["inputs"] if e["name"] == "timestep")
    timestep["shape"] = ["2B"]
    (old / RESULT_FILE).write_text(json.dumps(record))
    with pytest.raises(UsageError, match=r"re-export it"):
        write_pipeline_folder(tiny_case.bundle, old, tmp_path / "pipeline")
    assert not (tmp_path / "pipeline").exists()
