"""Single-file checkpoints in the original (LDM) layout: ``--model model.safetensors``.

The files are made here from the ``tiny`` model by a test-side diffusers -> LDM renamer (diffusers ships only the
other direction); loading goes through the loader users hit (``load_model`` -> diffusers' converters).
"""

import json
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from slimexport.errors import ModelNotFoundError, UsageError
from slimexport.models import load_model
from slimexport.models.registry import REGISTRY, ModelSpec
from slimexport.models.single_file import detect_family

UNET_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
               ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str, pairs=UNET_RESNET) -> str:
    head, _, tail = rest.partition(".")
    return dict(pairs).get(head, head) + "." + tail


def ldm_unet_key(key: str, config) -> str:
    """A diffusers UNet2DConditionModel key in the LDM layout (``input_blocks``, ``middle_block``, ``output_blocks``)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    if key in top:
        return top[key]
    n = config.layers_per_block + 1  # LDM blocks per level: the resnets (+ attentions) and the down/up sampler
    p = key.split(".")
    if p[0] == "down_blocks":
        b, kind, i, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * n}.0.op.{'.'.join(p[5:])}"
        block = 1 + b * n + i
        return f"input_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{block}.1.{rest}"
    if p[0] == "mid_block":
        i, rest = int(p[2]), ".".join(p[3:])
        return f"middle_block.{2 * i}.{_resnet(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}"
    if p[0] == "up_blocks":
        b, kind, i, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
        if kind == "upsamplers":
            has_attn = config.up_block_types[b].startswith("CrossAttn")
            return f"output_blocks.{b * n + n - 1}.{2 if has_attn else 1}.conv.{'.'.join(p[5:])}"
        block = b * n + i
        return f"output_blocks.{block}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{block}.1.{rest}"
    raise KeyError(key)


VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out", "proj_out"))


def ldm_vae(vae) -> dict:
    """An AutoencoderKL's weights in the LDM layout (``first_stage_model.``; attention projections as 1x1 convs)."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    top, n = DIFFUSERS_TO_LDM_MAPPING["vae"], len(vae.config.block_out_channels)
    out = {}
    for key, v in vae.state_dict().items():
        p = key.split(".")
        if key in top:
            new = top[key]
        elif p[1] == "mid_block" and p[2] == "resnets":
            new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{_resnet('.'.join(p[4:]), [('conv_shortcut', 'nin_shortcut')])}"
        elif p[1] == "mid_block":  # attentions.0.<proj>.weight
            proj = dict(VAE_ATTN)[p[4]]
            new, v = f"{p[0]}.mid.attn_1.{proj}.{p[-1]}", v[:, :, None, None] if v.ndim == 2 else v
        else:  # encoder.down_blocks.i / decoder.up_blocks.i (LDM numbers decoder levels bottom-up)
            level = int(p[2]) if p[0] == "encoder" else n - 1 - int(p[2])
            name = "down" if p[0] == "encoder" else "up"
            if p[3] in ("downsamplers", "upsamplers"):
                new = f"{p[0]}.{name}.{level}.{p[3][:-2]}.conv.{p[-1]}"
            else:
                new = f"{p[0]}.{name}.{level}.block.{p[4]}.{_resnet('.'.join(p[5:]), [('conv_shortcut', 'nin_shortcut')])}"
        out["first_stage_model." + new] = v
    return out


def open_clip_text(text_encoder) -> dict:
    """A CLIPTextModel's weights in SD2's OpenCLIP layout (``cond_stage_model.model.``, fused q/k/v)."""
    renames = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
               ("self_attn.out_proj", "attn.out_proj"))
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    sd = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {}
    for key, v in sd.items():
        if key in top:
            out[top[key]] = v
        elif ".self_attn.q_proj." in key:
            layer, kind = key.split(".")[2], key.split(".")[-1]
            qkv = [sd[key.replace("q_proj", x)] for x in ("q_proj", "k_proj", "v_proj")]
            out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(qkv)
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        elif key.startswith("encoder.layers."):
            new = key.replace("encoder.layers.", "transformer.resblocks.")
            for a, b in renames:
                new = new.replace(a, b)
            out[new] = v
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def ldm_checkpoint(bundle, text: str = "clip", vae: bool = True) -> dict:
    """``bundle`` as one LDM-layout state dict: UNet, text encoder (``clip`` (SD1), ``open_clip`` (SD2) or none), VAE."""
    sd = {"model.diffusion_model." + ldm_unet_key(k, bundle.unet.config): v for k, v in bundle.unet.state_dict().items()}
    te = bundle.components["text_encoder"]
    if text == "clip":
        sd.update({"cond_stage_model.transformer.text_model." + k.removeprefix("text_model."): v
                   for k, v in te.state_dict().items()})
    elif text == "open_clip":
        sd.update(open_clip_text(te))
    if vae:
        sd.update(ldm_vae(bundle.components["vae"]))
    return {k: v.contiguous() for k, v in sd.items()}


def _save(sd: dict, path) -> str:
    save_file(sd, str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory):
    return _save(ldm_checkpoint(tiny), tmp_path_factory.mktemp("single") / "tiny-finetune.safetensors")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # copies of the same numbers, no arithmetic


def test_the_test_renamer_is_the_inverse_of_diffusers_converters(tiny):
    """The whole of each part is renamed (no key lost or left in diffusers' layout)."""
    sd = ldm_checkpoint(tiny)
    n = {p: sum(k.startswith(p) for k in sd) for p in ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")}
    assert n == {"model.diffusion_model.": len(tiny.unet.state_dict()),
                 "cond_stage_model.": len(tiny.components["text_encoder"].state_dict()),
                 "first_stage_model.": len(tiny.components["vae"].state_dict())}
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sd and "model.diffusion_model.output_blocks.1.2.conv.weight" in sd


def test_a_single_file_loads_as_the_model_it_was_made_from(tiny, tiny_file, tiny_inputs, caplog):
    with caplog.at_level(logging.INFO, logger="slimexport.models.single_file"):
        b = load_model(tiny_file)
    assert "a tiny checkpoint (from its keys)" in caplog.text
    assert b.source == f"local:{tiny_file}" and b.name == tiny_file
    assert (b.image_size, b.vae_scale_factor, b.scheduler_config) == (tiny.image_size, tiny.vae_scale_factor, tiny.scheduler_config)
    _same_weights(b.unet, tiny.unet)
    _same_weights(b.components["text_encoder"], tiny.components["text_encoder"])
    _same_weights(b.components["vae"], tiny.components["vae"])
    x, ctx, ts = tiny_inputs
    with torch.no_grad():
        for t in ts[:2]:
            tt = torch.full((x.shape[0],), t)
            torch.testing.assert_close(b.unet(x, tt, ctx).sample, tiny.unet(x, tt, ctx).sample)
    prompts = ["a red fox in the snow", ""]
    torch.testing.assert_close(b.encoder.encode(prompts)[0], tiny.encoder.encode(prompts)[0])
    assert all(p.dtype == torch.float32 for p in b.unet.parameters())


def test_fp16_open_clip_unet_only_and_config_of(tiny, tmp_path, tiny_inputs):
    """SD2's OpenCLIP text layout converts; fp16 weights load as fp32; a UNet-only file gets a stand-in encoder."""
    half = {k: v.half() for k, v in ldm_checkpoint(tiny, text="open_clip", vae=False).items()}
    b = load_model(_save(half, tmp_path / "openclip.safetensors"), config_of="tiny")
    te, ref = b.components["text_encoder"].state_dict(), tiny.components["text_encoder"].state_dict()
    assert te.keys() == ref.keys() and all(torch.equal(te[k], ref[k].half().float()) for k in te)
    assert "vae" not in b.components and b.unet.dtype == torch.float32
    unet_only = {k: v for k, v in ldm_checkpoint(tiny, text="none", vae=False).items()}
    u = load_model(_save(unet_only, tmp_path / "unet-only.safetensors"))
    _same_weights(u.unet, tiny.unet)
    assert u.encoder.encode(["x"])[0].shape[-1] == tiny.unet.config.cross_attention_dim


def test_the_fingerprint_covers_the_files_weights(tiny, tiny_file, tmp_path):
    base = load_model(tiny_file).identity()
    assert base == load_model(tiny_file).identity() and not base.startswith("recipe:")
    for key in ("model.diffusion_model.out.2.bias", "cond_stage_model.transformer.text_model.final_layer_norm.bias"):
        sd = ldm_checkpoint(tiny)
        sd[key] = sd[key] + 1.0
        assert load_model(_save(sd, tmp_path / "changed.safetensors")).identity() != base, key


def _shapes(ctx: int, linear: bool, c0: int = 320, c_in: int = 4) -> dict:
    u = "model.diffusion_model."
    return {u + "input_blocks.0.0.weight": (c0, c_in, 3, 3), u + "out.2.weight": (4, c0, 3, 3),
            u + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (c0, ctx),
            u + "input_blocks.1.1.proj_in.weight": (c0, c0) if linear else (c0, c0, 1, 1)}


def test_the_family_is_detected_from_the_keys(tmp_path):
    where = tmp_path / "m.safetensors"
    assert detect_family(_shapes(768, False), where) == "sd15"
    assert detect_family(_shapes(1024, True), where) == "sd21-base"
    assert detect_family(_shapes(32, False, c0=32), where) == "tiny"
    with pytest.raises(UsageError, match="context width 1024, convolution proj_in.*matches no registry") as err:
        detect_family(_shapes(1024, False), where)
    assert "--config-of" in err.value.fix
    with pytest.raises(UsageError, match="in_channels=9 != out_channels=4"):
        detect_family(_shapes(768, False, c_in=9), where)
    with pytest.raises(UsageError, match="addition_embed_type='text_time'.*SDXL"):
        detect_family({**_shapes(2048, True), "conditioner.embedders.0.transformer.x": (1,)}, where)


@pytest.mark.parametrize("name, content, pattern", [
    ("sd15.ckpt", b"PK\x03\x04", "pickled checkpoint (.ckpt): slimexport never loads pickles"),
    ("model.bin", b"\x80\x02", "pickled checkpoint"),
    ("broken.safetensors", b"\x00garbage" * 8, "not a readable .safetensors file"),
])
def test_pickles_and_other_files_are_refused(tmp_path, name, content, pattern):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UsageError, match=re.escape(pattern)) as err:
        load_model(str(tmp_path / name))
    assert "\n" not in str(err.value)
    if name.endswith((".ckpt", ".bin")):
        assert "safetensors" in err.value.fix


def test_other_layouts_and_mismatches_say_what_to_do(tiny, tmp_path, monkeypatch):
    diffusers_layout = _save(dict(tiny.unet.state_dict()), tmp_path / "unet.safetensors")
    with pytest.raises(UsageError, match="no model.diffusion_model.* weights.*diffusers' UNet layout"):
        load_model(diffusers_layout)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "missing.safetensors"))
    tiny_file = _save(ldm_checkpoint(tiny), tmp_path / "t.safetensors")
    with pytest.raises(UsageError, match="--config-of 'digits' is not a registry architecture"):
        load_model(tiny_file, config_of="digits")
    with pytest.raises(UsageError, match="applies to a single-file checkpoint"):
        load_model("tiny", config_of="tiny")
    wide = {**REGISTRY["tiny"].unet_config, "block_out_channels": [32, 96]}
    monkeypatch.setitem(REGISTRY, "tiny-wide", ModelSpec("tiny-wide", None, wide, REGISTRY["tiny"].text_config))
    with pytest.raises(UsageError, match="UNet weights do not fit the architecture.*wrong shape") as err:
        load_model(tiny_file, config_of="tiny-wide")
    assert "--config-of tiny-wide is not this file's architecture" in err.value.fix


def _fake_hub_cache(cache, repo_id: str) -> None:
    """``repo_id``'s tokenizer/ in Hugging Face cache layout (the shipped character tokenizer's files)."""
    from importlib import resources

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / ("0" * 40) / "tokenizer"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    src = resources.files("slimexport") / "data" / "char_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        (snap / name).write_text((src / name).read_text(encoding="utf-8"), encoding="utf-8")
    (snap / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))


def test_the_tokenizer_comes_from_the_local_cache_or_the_error_says_how(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = REGISTRY["tiny"]
    monkeypatch.setitem(REGISTRY, "tiny-hub", ModelSpec("tiny-hub", "owner/tiny", spec.unet_config, spec.text_config,
                                                        vae_config=spec.vae_config))
    path = _save(ldm_checkpoint(tiny), tmp_path / "t.safetensors")
    with pytest.raises(UsageError, match="holds no tokenizer.*owner/tiny.*not in the local Hugging Face cache") as err:
        load_model(path, config_of="tiny-hub")
    assert "hf download owner/tiny --include 'tokenizer/*'" in err.value.fix
    _fake_hub_cache(tmp_path / "hub", "owner/tiny")
    b = load_model(path, config_of="tiny-hub")
    assert b.encoder.tokenizer.get_vocab() == tiny.encoder.tokenizer.get_vocab()
    _same_weights(b.components["text_encoder"], tiny.components["text_encoder"])


def test_config_of_is_a_validated_config_field_and_a_cli_option(tiny_file, tmp_path, capsys):
    from slimexport.cli.main import main
    from slimexport.config import CompressConfig
    from slimexport.errors import ConfigError

    assert main(["compress", "--model", tiny_file, "--config-of", "tiny", "--dump-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["config_of"] == "tiny" and cfg["model"] == tiny_file
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["compress", "--config", str(tmp_path / "c.json"), "--dump-config"]) == 0
    assert json.loads(capsys.readouterr().out)["config_of"] == "tiny"
    assert main(["compress", "--model", tiny_file, "--config-of", "digits"]) == 2
    assert "CompressConfig.config_of='digits' is invalid (flag --config-of)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="config_of"):
        CompressConfig(model="sd15", random_weights=True, config_of="sd15")
