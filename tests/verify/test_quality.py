"""Quality metrics: ε error, trajectory error, Fréchet distance, the digits judge."""

import copy

import pytest
import torch

from slimexport.models import load_model
from slimexport.verify.quality import (
    eps_relative_error,
    final_sample_error,
    frechet_distance,
    sample_trajectory,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


def _perturbed(unet, scale=1e-2):
    other = copy.deepcopy(unet)
    with torch.no_grad():
        w = other.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2").weight
        w.add_(scale * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
    return other


def test_eps_error_zero_for_identical_models(tiny):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond, _ = tiny.encoder.encode(["a cat", "a dog"])
    err = eps_relative_error(tiny.unet, tiny.unet, x, [1, 500, 999], cond)
    assert set(err) == {1, 500, 999} and all(v == 0.0 for v in err.values())
    err2 = eps_relative_error(tiny.unet, _perturbed(tiny.unet), x, [1, 999], cond)
    assert all(0 < v < 1 for v in err2.values())


def test_trajectory_sd_bundle(tiny):
    out = sample_trajectory(tiny.unet, tiny, ["a cat", "a dog"], seed=3, steps=4, guidance=5.0)
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert torch.equal(out, sample_trajectory(tiny.unet, tiny, ["a cat", "a dog"], seed=3, steps=4, guidance=5.0))
    assert not torch.equal(out, sample_trajectory(tiny.unet, tiny, ["a cat", "a dog"], seed=4, steps=4, guidance=5.0))
    no_cfg = sample_trajectory(tiny.unet, tiny, ["a cat"], seed=3, steps=4, guidance=1.0)
    assert no_cfg.shape == (1, 4, 16, 16)


def test_final_sample_error(tiny):
    same = final_sample_error(tiny.unet, tiny.unet, tiny, ["a cat"], seed=0, steps=3, guidance=3.0)
    assert same == {"rel_l2": 0.0, "max_abs": 0.0}
    diff = final_sample_error(tiny.unet, _perturbed(tiny.unet, 0.1), tiny, ["a cat"], seed=0, steps=3, guidance=3.0)
    assert diff["rel_l2"] > 0 and diff["max_abs"] > 0


def test_labels_need_a_label_encoder(tiny):
    from slimexport.errors import UsageError

    with pytest.raises(UsageError, match="class labels"):
        sample_trajectory(tiny.unet, tiny, [1, 2], steps=2)
    with pytest.raises(UsageError, match="single string"):
        sample_trajectory(tiny.unet, tiny, "a cat", steps=2)


def test_frechet_distance_identity_and_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + 1.0)
    assert shifted == pytest.approx(8.0, rel=1e-6)  # |Δμ|² = 8, same covariance
    b = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert frechet_distance(a, b) > 0
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-6)


def test_frechet_distance_of_gaussians():
    # b = 2a: |μb − μa|² = |μa|², Σb = 4Σa, so FD = |μa|² + tr Σa (1 + 4 − 2·2) = |μa|² + tr Σa (≈ d for N(0, I))
    a = torch.randn(20000, 3, generator=torch.Generator().manual_seed(1)).double()
    expected = float(a.mean(0).square().sum() + torch.cov(a.T).trace())
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-4)
    assert expected == pytest.approx(3.0, rel=0.05)


@pytest.fixture(scope="module")
def judge():
    pytest.importorskip("sklearn")
    from slimexport.verify.quality import DigitsJudge

    return DigitsJudge.fit()


def test_judge_on_real_digits(judge):
    images, labels = judge.test_images, judge.test_labels
    assert len(images) == len(labels) > 300 and set(labels.tolist()) == set(range(10))
    # accuracy from the classifier's own predictions, counted by hand
    sk_pred = torch.as_tensor(judge.clf.predict(images.reshape(len(images), -1).double().numpy()))
    assert torch.equal(judge.predict(images), sk_pred.long())
    by_hand = sum(int(p) == int(y) for p, y in zip(sk_pred, labels)) / len(labels)
    assert judge.test_accuracy == pytest.approx(by_hand, abs=1e-12)
    assert judge.test_accuracy > 0.95
    assert judge.accuracy(images, labels) == pytest.approx(by_hand, abs=1e-12)
    assert judge.accuracy(images, labels.tolist()) == pytest.approx(by_hand, abs=1e-12)
    # wrong labels: a judge this accurate gets almost none of them
    wrong = (labels + 1) % 10
    assert judge.accuracy(images, wrong) == pytest.approx(float((sk_pred == wrong).double().mean()), abs=1e-12)
    assert judge.accuracy(images, wrong) < 0.05
    feats = judge.features(images[:10])
    assert feats.shape == (10, judge.HIDDEN[-1]) and feats.dtype == torch.float64
    assert bool((feats >= 0).all()) and float(feats.abs().sum()) > 0  # ReLU activations, not all dead
    # the features are the last hidden layer: the output layer applied to them gives the predictions
    logits = feats @ torch.from_numpy(judge.clf.coefs_[-1]) + torch.from_numpy(judge.clf.intercepts_[-1])
    assert torch.equal(logits.argmax(1), sk_pred[:10].long())


def test_judge_frechet(judge):
    real = judge.test_images
    self_fd = judge.frechet(real)
    assert self_fd["fd"] == pytest.approx(0.0, abs=1e-6) and self_fd["n"] == self_fd["n_ref"] == len(real)
    noisy = (real + 0.5 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    out = judge.frechet(noisy, n_boot=5)
    assert out["fd"] > 10 * max(out["fd_boot_std"], 1e-3) > 0
    from slimexport.models.digits import digits_images, load_split

    images, _ = digits_images()
    train = images[torch.tensor(load_split()["train"][:360])]
    assert judge.frechet(train)["fd"] < out["fd"]  # real unseen digits are closer than noisy ones


def test_judge_rejects_wrong_shapes(judge):
    from slimexport.errors import UsageError

    with pytest.raises(UsageError, match=r"\[B, 1, 16, 16\]"):
        judge.predict(torch.zeros(2, 4, 16, 16))
