"""Whitened SVD of a projection: exact at full rank, error = discarded σ² tail, optimal in the activation norm."""

import pytest
import torch

from slimexport.decompose.linalg import cholesky, ridge
from slimexport.decompose.proj_svd import proj_factors


def _problem(n_in=24, n_out=20, tokens=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g, dtype=torch.float64) * torch.logspace(0, -2, n_in, dtype=torch.float64)
    x = torch.randn(tokens, n_in, generator=g, dtype=torch.float64) @ mix
    w = torch.randn(n_out, n_in, generator=g, dtype=torch.float64)
    c = ridge(x.T @ x, 1e-9)
    return x, w, c, cholesky(c)[0]


def _output_error(x, w, u, v):
    return float(((x @ w.T - x @ (u @ v)) ** 2).sum())


@pytest.mark.parametrize("whiten", [True, False])
def test_full_rank_reproduces_the_weight(whiten):
    _, w, _, L = _problem()
    f = proj_factors(w, L if whiten else None)
    u, v = f.truncate(min(w.shape))
    assert torch.allclose(u @ v, w.T, atol=1e-10)
    assert f.error(min(w.shape)) == 0.0


@pytest.mark.parametrize("rank", [1, 5, 12, 19])
def test_whitened_error_is_the_discarded_tail(rank):
    x, w, c, L = _problem()
    f = proj_factors(w, L)
    u, v = f.truncate(rank)
    d = w.T - u @ v
    assert float(torch.einsum("ij,ik,kj->", d, c, d)) == pytest.approx(f.error(rank), rel=1e-8)
    # with C = XᵀX (ridge ~1e-9) that is the output error over the calibration tokens
    assert _output_error(x, w, u, v) == pytest.approx(f.error(rank), rel=1e-5)


@pytest.mark.parametrize("rank", [3, 8])
def test_whitening_beats_plain_svd_on_the_calibration_tokens(rank):
    x, w, _, L = _problem(seed=3)
    fw, fp = proj_factors(w, L), proj_factors(w, None)
    assert _output_error(x, w, *fw.truncate(rank)) < 0.99 * _output_error(x, w, *fp.truncate(rank))
    assert fw.rel_error(0) == 1.0 and 0 < fw.rel_error(rank) < 1
