"""Loading diffusers pipeline folders: unsupported UNets, broken files, weight variants, the sampler and VAE settings."""

import json
import shutil

import pytest
import torch

from slimexport.errors import ModelNotFoundError, UsageError
from slimexport.models import load_model
from slimexport.models.load import PIPELINE_PARTS, check_supported_unet
from slimexport.models.registry import DIGITS_SCHEDULER, REGISTRY, SD_SCHEDULER


@pytest.fixture(scope="module")
def saved_pipe(tiny, tmp_path_factory):
    """The tiny model saved as a StableDiffusionPipeline folder (DDIM scheduler, VAE with 2 levels)."""
    path = tmp_path_factory.mktemp("pipes") / "pipe"
    tiny.pipeline().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def pipe(saved_pipe, tmp_path):
    """A private copy of the saved pipeline, to break."""
    return shutil.copytree(saved_pipe, tmp_path / "pipe")


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _one_line_error(folder) -> str:
    with pytest.raises(UsageError) as err:
        load_model(str(folder))
    msg = str(err.value)
    assert "\n" not in msg and err.value.fix
    return msg


# 1. unsupported UNets are refused at load time, before calibration


@pytest.mark.parametrize("changes, named", [
    ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
    ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ({"in_channels": 9}, "in_channels=9 != out_channels=4"),
])
def test_unsupported_unet_is_refused_at_load(pipe, changes, named):
    _edit_json(pipe / "unet" / "config.json", **changes)
    for folder in (pipe, pipe / "unet"):
        msg = _one_line_error(folder)
        assert named in msg and "not supported" in msg and "SD1.x/SD2.x" in msg


def test_unsupported_unet_only_folder_and_second_text_encoder(pipe, tmp_path):
    _edit_json(pipe / "model_index.json", text_encoder_2=["transformers", "CLIPTextModelWithProjection"])
    assert "text_encoder_2" in _one_line_error(pipe)
    lone = shutil.copytree(pipe / "unet", tmp_path / "lone")
    _edit_json(lone / "config.json", addition_embed_type="text_time")
    assert "addition_embed_type" in _one_line_error(lone)


def test_registry_and_builtin_models_are_supported(tiny):
    for spec in REGISTRY.values():
        check_supported_unet(spec.unet_config, spec.name)
    check_supported_unet(dict(tiny.unet.config), "tiny")
    check_supported_unet(dict(load_model("digits").unet.config), "digits")


# 2. broken folders: one line naming the file, never a traceback or advice to load mismatched weights


def test_broken_scheduler_and_model_index_json(pipe):
    sched = pipe / "scheduler" / "scheduler_config.json"
    good = sched.read_text()
    sched.write_text("{broken")
    assert "scheduler_config.json is not a valid JSON file" in _one_line_error(pipe)
    sched.write_text("[1, 2]")
    assert "scheduler_config.json holds a JSON list, not an object" in _one_line_error(pipe)
    sched.write_text(good)
    for bad in ({"beta_schedule": "no-such-schedule"}, {"timestep_spacing": "sideways"}):
        sched.write_text(good)
        _edit_json(sched, **bad)
        assert "scheduler_config.json is not a usable DDIM schedule" in _one_line_error(pipe)
    sched.write_text(good)
    (pipe / "model_index.json").write_text("not json")
    assert "model_index.json is not a valid JSON file" in _one_line_error(pipe)


def test_unet_config_that_does_not_match_its_weights(pipe):
    _edit_json(pipe / "unet" / "config.json", block_out_channels=[48, 64])
    msg = _one_line_error(pipe)
    assert "config.json does not match its weights" in msg and "size mismatch" in msg
    assert "ignore_mismatched_sizes" not in msg


def test_unet_config_value_of_the_wrong_type(pipe):
    _edit_json(pipe / "unet" / "config.json", cross_attention_dim="abc")
    assert "a config.json value has the wrong type" in _one_line_error(pipe)


@pytest.mark.parametrize("part", ["tokenizer", "text_encoder"])
def test_missing_pipeline_part_is_named(pipe, part):
    shutil.rmtree(pipe / part)
    msg = _one_line_error(pipe)
    assert f"has no {part}/ subfolder" in msg and "safe_serialization" not in msg


def test_empty_tokenizer_folder_is_refused(pipe):
    for f in (pipe / "tokenizer").iterdir():
        f.unlink()
    assert "tokenizer has no vocab.json or tokenizer.json" in _one_line_error(pipe)


# 3. the not-found fix is an `hf download` of exactly what the loader reads


def test_not_found_suggests_hf_download_of_pipeline_parts():
    with pytest.raises(ModelNotFoundError) as err:
        load_model("sd15")
    msg = str(err.value)
    assert f"hf download {REGISTRY['sd15'].hub_id} --include " in msg and "--local-dir DIR" in msg
    for part in PIPELINE_PARTS:
        assert (f"'{part}'" if "*" in part else part) in msg
    assert "huggingface-cli" not in msg and "'unet/*'" not in msg


def test_hub_download_failure_names_hf_auth_login(monkeypatch):
    import huggingface_hub

    from slimexport.models import load as load_mod

    def fail(*args, **kwargs):
        raise OSError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    monkeypatch.setattr(load_mod, "hub_reachable", lambda *a, **k: True)
    with pytest.raises(ModelNotFoundError, match="hf auth login") as err:
        load_model("owner/private-model")
    assert "huggingface-cli" not in str(err.value)


# 4. weights saved as a variant (save_pretrained(variant="fp16")) load when they are the only ones


def test_variant_only_folder_loads_in_fp32(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "fp16v"
    tiny.pipeline().save_pretrained(path, safe_serialization=True, variant="fp16")
    assert not (path / "unet" / "diffusion_pytorch_model.safetensors").exists()
    te_file = path / "text_encoder" / "model.fp16.safetensors"
    save_file({k: v.half() for k, v in load_file(te_file).items()}, te_file, metadata={"format": "pt"})
    b = load_model(str(path))
    assert {"vae", "text_encoder"} <= b.components.keys()
    for name, p in b.unet.state_dict().items():
        assert p.dtype == torch.float32 and torch.equal(p, tiny.unet.state_dict()[name])
    for name, p in b.components["text_encoder"].state_dict().items():
        want = tiny.components["text_encoder"].state_dict()[name]
        assert p.dtype == want.dtype
        assert torch.equal(p, want.half().float() if want.is_floating_point() else want)


def test_several_variants_and_no_default_is_refused(pipe):
    unet = pipe / "unet"
    default = unet / "diffusion_pytorch_model.safetensors"
    shutil.copy(default, unet / "diffusion_pytorch_model.fp16.safetensors")
    load_model(str(pipe))  # the default weights win over variants
    default.rename(unet / "diffusion_pytorch_model.non_ema.safetensors")
    msg = _one_line_error(pipe)
    assert "only the variants fp16, non_ema" in msg and "safe_serialization" not in msg


def test_pickles_only_are_still_refused(tiny, tmp_path):
    tiny.unet.save_pretrained(tmp_path / "u", safe_serialization=False)
    assert "pickled .bin files are never loaded" in _one_line_error(tmp_path / "u")


# 5. calibration samples with the pipeline's own sampler settings, in DDIM


def test_scheduler_config_is_read_in_full(pipe):
    from diffusers import DDIMScheduler

    own = {"_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
           "beta_schedule": "scaled_linear", "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
           "timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "thresholding": False,
           "prediction_type": "v_prediction", "skip_prk_steps": True}
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(own))
    b = load_model(str(pipe))
    for key, value in own.items():
        if key in ("_class_name", "skip_prk_steps"):  # not DDIM's
            assert key not in b.scheduler_config
        else:
            assert b.scheduler_config[key] == value
    ours, theirs = b.make_scheduler(), DDIMScheduler.from_config(own)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)
    assert ours.final_alpha_cumprod == theirs.final_alpha_cumprod == 1.0
    # trained betas are kept too
    betas = torch.linspace(1e-4, 2e-2, 1000).tolist()
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"trained_betas": betas}))
    assert torch.allclose(load_model(str(pipe)).make_scheduler().betas, torch.tensor(betas))


def test_keys_the_scheduler_file_leaves_out_are_sds(pipe):
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({"beta_schedule": "linear"}))
    assert load_model(str(pipe)).scheduler_config == {**SD_SCHEDULER, "beta_schedule": "linear"}
    shutil.rmtree(pipe / "scheduler")
    assert load_model(str(pipe)).scheduler_config == SD_SCHEDULER


def test_builtin_models_keep_their_samplers(tiny):
    assert tiny.scheduler_config == SD_SCHEDULER and tiny.vae_scale_factor == 2
    digits = load_model("digits")
    assert digits.scheduler_config == DIGITS_SCHEDULER and digits.vae_scale_factor == 1


# 6. the VAE scale factor comes from vae/config.json, as in diffusers


def test_vae_scale_factor_follows_the_vae(tiny, pipe):
    b = load_model(str(pipe))
    assert b.vae_scale_factor == tiny.pipeline().vae_scale_factor == 2
    assert b.image_size == tiny.image_size == (32, 32) and b.latent_size() == (16, 16)
    # a VAE config without weights (what a hub download takes) still gives the factor
    (pipe / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    _edit_json(pipe / "vae" / "config.json", block_out_channels=[8, 16, 16])
    b = load_model(str(pipe))
    assert b.vae_scale_factor == 4 and "vae" not in b.components
    shutil.rmtree(pipe / "vae")
    assert load_model(str(pipe)).vae_scale_factor == 8
