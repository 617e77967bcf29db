"""SlimSet's pool embedding: padded to each batch's longest prompt, in length-sorted batches, on a chosen device."""

import pytest
import torch

from slimexport.calibrate.api import ENCODE_BATCH, embed_prompts
from slimexport.calibrate.prompts import shipped_pool

# empty, short, long, and longer than CLIP's 77 tokens (truncated)
PROMPTS = ["", "a cat", "a photo of a red fox standing in deep snow at dawn, soft light",
           " ".join(["a very long prompt"] * 40), "x"]


def test_clip_pooled_equals_the_full_length_encoding(tiny):
    enc = tiny.encoder
    full = enc.encode(PROMPTS)[1]
    short = enc.pooled(PROMPTS)
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    few = [p for p in PROMPTS if len(p) < 70]  # without the truncated one, the batch is shorter than 77 tokens
    assert len(enc.tokenizer(few, padding="longest", truncation=True, max_length=77).input_ids[0]) < 77
    torch.testing.assert_close(enc.pooled(few), enc.encode(few)[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], full[1])  # different prompts, different embeddings


def test_embed_prompts_keeps_the_callers_order(tiny):
    pool = shipped_pool()[0][: ENCODE_BATCH + 7]  # two batches, sorted by length inside
    emb = embed_prompts(tiny, pool)
    assert emb.shape == (len(pool), tiny.encoder.encode(pool[:1])[1].shape[-1]) and emb.dtype == torch.float32
    ref = torch.cat([tiny.encoder.encode(pool[i:i + 16])[1] for i in range(0, len(pool), 16)])
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert embed_prompts(tiny, []).shape[0] == 0


def test_digits_encoder_pooled_and_device(tmp_path):
    from slimexport.models import load_model

    digits = load_model("digits")
    enc = digits.encoder
    prompts = ["the digit 3", "a handwritten seven", "zero"]
    torch.testing.assert_close(enc.pooled(prompts), enc.encode(prompts)[1])
    assert enc.on_device("cpu") is enc
    torch.testing.assert_close(embed_prompts(digits, prompts), enc.encode(prompts)[1])


def test_on_device_never_moves_the_bundles_encoder(tiny):
    assert tiny.encoder.on_device("cpu") is tiny.encoder


@pytest.mark.gpu
def test_on_device_cuda_is_a_copy(tiny):
    enc = tiny.encoder.on_device("cuda")
    assert enc is not tiny.encoder and enc.text_encoder.device.type == "cuda"
    assert tiny.encoder.text_encoder.device.type == "cpu"
    torch.testing.assert_close(enc.pooled(PROMPTS).cpu(), tiny.encoder.pooled(PROMPTS), atol=1e-4, rtol=1e-4)
