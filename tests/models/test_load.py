import time

import pytest
import torch

from slimexport.errors import ModelNotFoundError, UsageError
from slimexport.models import load_model
from slimexport.models.arch import blocks
from slimexport.models.registry import REGISTRY


def test_registry_names_and_sd_configs():
    assert {"sd14", "sd15", "sd21-base", "tiny", "digits"} <= set(REGISTRY)
    assert REGISTRY["sd14"].hub_id == "CompVis/stable-diffusion-v1-4"
    assert REGISTRY["sd21-base"].unet_config["use_linear_projection"] is True
    assert REGISTRY["sd21-base"].unet_config["cross_attention_dim"] == 1024


def test_tiny_is_deterministic_and_sd_shaped(tiny):
    again = load_model("tiny")
    for (ka, va), (kb, vb) in zip(tiny.unet.state_dict().items(), again.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    bl = blocks(tiny.unet)
    assert len(bl) == 7 and {b.head_dim for b in bl} == {16, 32}
    assert tiny.identity() == again.identity()


@pytest.mark.slow
def test_sd21_base_random_weights_architecture():
    b = load_model("sd21-base", random_weights=True)
    bl = blocks(b.unet)
    assert {x.head_dim for x in bl} == {64} and {x.context_dim for x in bl} == {1024}
    assert sum(p.numel() for p in b.unet.parameters()) == 865_910_724


def test_missing_model_fails_within_seconds_with_fix():
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as err:
        load_model("sd15")
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "hf download" in msg and "--random-weights" in msg


def test_unknown_name_and_random_weights_for_non_registry():
    with pytest.raises(ModelNotFoundError, match="registry name"):
        load_model("no-such-model")
    with pytest.raises(UsageError, match="registry name"):
        load_model("owner/repo", random_weights=True)


def test_local_pipeline_and_unet_folders(tiny, tmp_path):
    pipe = tiny.pipeline()
    pipe.save_pretrained(tmp_path / "pipe", safe_serialization=True)
    b = load_model(str(tmp_path / "pipe"))
    assert b.source.startswith("local:")
    x = torch.randn(2, 4, 16, 16)
    ctx = b.encoder.encode(["a", "b"])[0]
    t = torch.tensor([10.0, 10.0])
    assert torch.allclose(b.unet(x, t, ctx).sample, tiny.unet(x, t, ctx).sample, atol=1e-6)
    assert torch.allclose(ctx, tiny.encoder.encode(["a", "b"])[0], atol=1e-6)
    # the unet/ subfolder of a pipeline resolves to the whole pipeline
    assert load_model(str(tmp_path / "pipe" / "unet")).components.keys() >= {"tokenizer", "text_encoder"}
    # a UNet-only folder loads too (random text conditioning, with a warning)
    tiny.unet.save_pretrained(tmp_path / "unet_only", safe_serialization=True)
    u = load_model(str(tmp_path / "unet_only"))
    assert u.encoder.encode(["x"])[0].shape[-1] == tiny.unet.config.cross_attention_dim


def test_pickled_weights_are_refused(tiny, tmp_path):
    tiny.unet.save_pretrained(tmp_path / "u", safe_serialization=False)
    with pytest.raises(UsageError, match="safetensors"):
        load_model(str(tmp_path / "u"))


def test_folder_that_is_not_diffusers(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(UsageError, match="not a diffusers folder"):
        load_model(str(tmp_path / "junk"))


def test_hub_download_takes_configs_and_safetensors_only():
    from huggingface_hub.utils import filter_repo_objects

    from slimexport.models.load import PIPELINE_PARTS

    repo = ["model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
            "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors", "unet/diffusion_pytorch_model.non_ema.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder/pytorch_model.bin",
            "text_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.safetensors", "sd-v1-4.ckpt",
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors", "unet/diffusion_pytorch_model.safetensors.index.json"]
    got = set(filter_repo_objects(repo, allow_patterns=PIPELINE_PARTS))
    assert got == {"model_index.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "scheduler/scheduler_config.json",
                   "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                   "text_encoder/model.safetensors", "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
                   "unet/diffusion_pytorch_model.safetensors.index.json"}
