"""The shipped ``digits`` model: loading, prompt parsing, the calibration pool, sampling."""

import pytest
import torch

from slimexport.errors import ArtifactError
from slimexport.models import get_spec, load_model
from slimexport.models.digits import (
    NULL_CLASS,
    DigitsPromptEncoder,
    bag_of_words,
    digits_prompt_pool,
    load_digits,
    parse_digit,
    prompt_label,
)
from slimexport.verify.quality import sample_trajectory


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_model("digits")


def test_loader_returns_a_bundle(bundle):
    spec = get_spec("digits")
    assert bundle.name == "digits" and bundle.source == "builtin"
    assert list(bundle.unet.config.block_out_channels) == [64, 128]
    assert bundle.unet.config.in_channels == 1 and bundle.vae_scale_factor == 1
    assert bundle.latent_size() == (16, 16) == spec.default_image
    assert isinstance(bundle.encoder, DigitsPromptEncoder)
    assert not any(p.requires_grad for p in bundle.unet.parameters())
    assert bundle.unet.dtype == torch.float32
    assert bundle.prompt_pool == digits_prompt_pool()
    bundle.make_scheduler()  # the registry schedule is a valid DDIM config


def test_architecture_is_sd_family(bundle):
    from slimexport.models.arch import blocks

    infos = blocks(bundle.unet)
    assert len(infos) == 7
    assert {(b.width, b.num_heads, b.head_dim, b.ffn_width) for b in infos} == {(64, 4, 16, 256), (128, 4, 32, 512)}
    assert all(b.context_dim == 64 for b in infos)


def test_missing_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(ArtifactError, match="tools/train_digits.py"):
        load_digits(tmp_path)


@pytest.mark.parametrize(("prompt", "label"), [
    ("a handwritten 7", 7), ("the digit seven", 7), ("number 3, written neatly", 3), ("Zero", 0),
    ("a bold NINE", 9), ("", None), ("a handwritten digit", None), ("someone wrote a 4", 4), ("nought", 0),
    ("8 or five", 8), ("five or 8", 5),
])
def test_parse_digit(prompt, label):
    assert parse_digit(prompt) == label
    assert prompt_label(prompt) == (NULL_CLASS if label is None else label)


def test_encoder_encode(bundle):
    enc = bundle.encoder
    prompts = ["a handwritten 7", "the digit seven", "", "number 3, written neatly"]
    hidden, pooled = enc.encode(prompts)
    assert hidden.shape == (4, enc.num_tokens, 64) and pooled.shape == (4, 64)
    assert torch.equal(hidden[0], hidden[1]) and torch.equal(hidden[2], enc.tokens[NULL_CLASS])
    assert not torch.equal(pooled[0], pooled[1])  # phrasings differ in pooled only
    cos = torch.nn.functional.cosine_similarity
    assert cos(pooled[0], pooled[1], dim=0) > cos(pooled[0], pooled[3], dim=0)
    assert torch.equal(enc.encode_labels(torch.tensor([7, 10])), hidden[[0, 2]])
    assert torch.equal(enc.encode(prompts)[1], pooled)  # deterministic


def test_bag_of_words_is_deterministic_and_unit():
    v = bag_of_words("a handwritten 7", 64)
    assert torch.equal(v, bag_of_words("A handwritten 7!", 64))
    assert abs(float(v.norm()) - 1) < 1e-5
    assert float(bag_of_words("", 64).norm()) == 0


def test_prompt_pool_covers_all_classes():
    pool = digits_prompt_pool()
    assert len(pool) >= 300 and len(set(pool)) == len(pool)
    counts = torch.bincount(torch.tensor([prompt_label(p) for p in pool]), minlength=11)
    assert counts[NULL_CLASS] == 0
    assert counts[:10].min() >= 30
    assert pool == digits_prompt_pool()


def test_ddim_trajectory(bundle):
    out = sample_trajectory(bundle.unet, bundle, [0, 3, 7], seed=0, steps=5, guidance=3.0)
    assert out.shape == (3, 1, 16, 16) and torch.isfinite(out).all()
    again = sample_trajectory(bundle.unet, bundle, ["a handwritten 0", "three", "the digit 7"], seed=0, steps=5, guidance=3.0)
    assert torch.equal(out, again)  # labels and prompts of the same classes give the same trajectory
