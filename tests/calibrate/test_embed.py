"""SlimSet's pool embedding: padded to each batch's longest prompt, in length-sorted batches, on a chosen device."""

import pytest
import torch

from slimexport.calibrate.api import ENCODE_BATCH, embed_prompts
from slimexport.calibrate.prompts import shipped_pool

# empty, short, long, and longer than CLIP's 77 tokens (truncated)
PROMPTS = ["", "a cat", "a photo of a red fox standing in deep snow at dawn, soft light",
           " ".join(["a very long prompt"] * 40), "x"]


def _input_lengths(text_encoder):
    """Spy on the text encoder's forward: the token length of each call's input ids (``(lengths, hook handle)``)."""
    lengths = []

    def spy(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        lengths.append(ids.shape[-1])

    return lengths, text_encoder.register_forward_pre_hook(spy, with_kwargs=True)


def test_clip_pooled_equals_the_full_length_encoding(tiny):
    enc = tiny.encoder
    lengths, handle = _input_lengths(enc.text_encoder)
    try:
        full = enc.encode(PROMPTS)[1]
        assert lengths == [77]  # encode pads to CLIP's full length
        short = enc.pooled(PROMPTS)
        assert lengths == [77, 77]  # the truncated prompt makes this batch's longest 77 tokens
        torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
        few = [p for p in PROMPTS if len(p) < 70]  # without the truncated one, the batch is shorter than 77 tokens
        longest = max(len(ids) for ids in enc.tokenizer(few, truncation=True, max_length=77).input_ids)
        assert longest < 77
        del lengths[:]
        pooled_few = enc.pooled(few)
        assert lengths == [longest]  # padded to the batch's longest prompt only, not to 77
        full_few = enc.encode(few)[1]
        assert lengths == [longest, 77]
    finally:
        handle.remove()
    torch.testing.assert_close(pooled_few, full_few, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[0], full[1])  # different prompts, different embeddings


def test_embed_prompts_keeps_the_callers_order(tiny):
    pool = shipped_pool()[0][: ENCODE_BATCH + 7]  # two batches, sorted by length inside
    emb = embed_prompts(tiny, pool)
    assert emb.shape == (len(pool), tiny.encoder.encode(pool[:1])[1].shape[-1]) and emb.dtype == torch.float32
    ref = torch.cat([tiny.encoder.encode(pool[i:i + 16])[1] for i in range(0, len(pool), 16)])
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    assert embed_prompts(tiny, []).shape[0] == 0


def _digits_pooled(enc, prompt: str, label: int) -> torch.Tensor:
    """The documented pooled embedding, by hand: mean(class tokens) + BOW_SCALE·‖mean‖·(unit bag of words), the bag
    the normalised sum of one Gaussian vector per lower-case word, seeded by the word's sha256."""
    import hashlib
    import re

    from slimexport.models.digits import BOW_SCALE

    mean = enc.tokens[label].detach().mean(0)
    vecs = []
    for w in re.findall(r"[a-z0-9]+", prompt.lower()):
        seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little") & ((1 << 63) - 1)
        vecs.append(torch.randn(enc.dim, generator=torch.Generator().manual_seed(seed)))
    bow = torch.stack(vecs).sum(0)
    return mean + BOW_SCALE * mean.norm() * bow / bow.norm()


def test_digits_encoder_pooled_and_device(tmp_path):
    from slimexport.models import load_model

    digits = load_model("digits")
    enc = digits.encoder
    prompts = ["the digit 3", "a handwritten seven", "zero"]
    labels = [3, 7, 0]
    hidden, pooled = enc.encode(prompts)
    expect = torch.stack([_digits_pooled(enc, p, c) for p, c in zip(prompts, labels)])
    torch.testing.assert_close(pooled, expect)
    torch.testing.assert_close(hidden, enc.tokens.detach()[labels])
    torch.testing.assert_close(enc.pooled(prompts), expect)
    # two phrasings of one digit: distinct points, closer to each other than to another digit
    two = enc.pooled(["the digit 3", "a handwritten three", "the digit 8"])
    assert 0 < float((two[0] - two[1]).norm()) < float((two[0] - two[2]).norm())
    assert enc.on_device("cpu") is enc
    torch.testing.assert_close(embed_prompts(digits, prompts), expect)
    # embed_prompts sorts by length to batch: the rows still come back in the caller's (shuffled) order
    shuffled = ["zero", "a handwritten seven", "the digit 3", "a quickly scribbled 5", "nine"]
    shuffled_labels = [0, 7, 3, 5, 9]
    assert sorted(shuffled, key=len) != shuffled
    expect = torch.stack([_digits_pooled(enc, p, c) for p, c in zip(shuffled, shuffled_labels)])
    torch.testing.assert_close(embed_prompts(digits, shuffled), expect)
    perm = [3, 0, 4, 2, 1]
    torch.testing.assert_close(embed_prompts(digits, [shuffled[i] for i in perm]), expect[perm])


def test_on_device_never_moves_the_bundles_encoder(tiny):
    assert tiny.encoder.on_device("cpu") is tiny.encoder


@pytest.mark.gpu
def test_on_device_cuda_is_a_copy(tiny):
    enc = tiny.encoder.on_device("cuda")
    assert enc is not tiny.encoder and enc.text_encoder.device.type == "cuda"
    assert tiny.encoder.text_encoder.device.type == "cpu"
    torch.testing.assert_close(enc.pooled(PROMPTS).cpu(), tiny.encoder.pooled(PROMPTS), atol=1e-4, rtol=1e-4)
