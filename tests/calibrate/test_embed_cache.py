"""The SlimSet pool's embeddings are cached by encoder and pool content: a new calibration reuses them."""

import torch

from slimexport.calibrate import api as calib_api
from slimexport.config import CalibConfig


def _count_embeds(monkeypatch):
    calls = []
    real = calib_api.embed_prompts

    def counting(bundle, prompts, device=None):
        calls.append(len(prompts))
        return real(bundle, prompts, device)

    monkeypatch.setattr(calib_api, "embed_prompts", counting)
    return calls


def test_second_selection_reuses_the_pool_embeddings(tiny, tmp_path, monkeypatch):
    calls = _count_embeds(monkeypatch)
    cfg = CalibConfig(num_prompts=4)
    first = calib_api.select_prompts(tiny, cfg, device="cpu", cache_dir=tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.safetensors"))) == 1
    second = calib_api.select_prompts(tiny, cfg.replace(num_prompts=6), device="cpu", cache_dir=tmp_path)
    assert len(calls) == 1  # the pool was not embedded again
    assert calib_api.select_prompts(tiny, cfg, device="cpu", cache_dir=tmp_path) == first
    assert second == calib_api.select_prompts(tiny, cfg.replace(num_prompts=6), device="cpu")  # as without a cache
    assert len(calls) == 2


def test_cache_key_follows_pool_content_and_survives_damage(tiny, tmp_path, monkeypatch):
    calls = _count_embeds(monkeypatch)
    a = calib_api.cached_embeddings(tiny, ["a red fox", "a blue car"], "cpu", tmp_path)
    b = calib_api.cached_embeddings(tiny, ["a red fox", "a green car"], "cpu", tmp_path)
    assert len(calls) == 2 and not torch.equal(a, b)
    for f in tmp_path.glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    again = calib_api.cached_embeddings(tiny, ["a red fox", "a blue car"], "cpu", tmp_path)
    assert len(calls) == 3 and torch.allclose(again, a)  # a damaged entry is embedded again, not trusted


def test_encoder_identity_ignores_the_unet(tiny):
    from slimexport.models.load import load_model

    other = load_model("tiny")
    with torch.no_grad():
        next(other.unet.parameters()).add_(1.0)
    other.fingerprint = None
    assert other.identity() != tiny.identity()
    assert other.encoder_identity() == tiny.encoder_identity()
