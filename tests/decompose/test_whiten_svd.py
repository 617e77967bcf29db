import pytest
import torch

from slimexport.decompose.linalg import cholesky, ridge
from slimexport.decompose.whiten_svd import qk_factors, qk_weights, vo_factors, vo_weights


def _spd(n, m, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return x.T @ x


def _qk_error(wq, wk, q, k, heads, cq, ck):
    d, r = wq.shape[0] // heads, q.shape[0] // heads
    err = 0.0
    for h in range(heads):
        m = wq[h * d:(h + 1) * d].T @ wk[h * d:(h + 1) * d]
        mh = q[h * r:(h + 1) * r].T @ k[h * r:(h + 1) * r]
        diff = m - mh
        err += float(torch.trace(diff.T @ cq @ diff @ ck))
    return err


@pytest.mark.parametrize("rank", [8, 5, 1])
def test_qk_whitened_error_is_discarded_tail(rank):
    heads, d, n, nk = 3, 8, 24, 16
    g = torch.Generator().manual_seed(1)
    wq = torch.randn(heads * d, n, generator=g, dtype=torch.float64)
    wk = torch.randn(heads * d, nk, generator=g, dtype=torch.float64)
    cq, ck = _spd(n, 100, 2), _spd(nk, 60, 3)
    f = qk_factors(wq, wk, heads, cholesky(cq)[0], cholesky(ck)[0])
    q, k = qk_weights(f, rank)
    measured = _qk_error(wq, wk, q, k, heads, cq, ck)
    tail = float((f.sigma[:, rank:] ** 2).sum())
    assert measured == pytest.approx(tail, rel=1e-8, abs=1e-9)
    assert float(f.error(rank)) == pytest.approx(tail, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("rank", [8, 4, 2])
def test_vo_whitened_error_is_discarded_tail(rank):
    heads, d, n, c_out = 2, 8, 20, 20
    g = torch.Generator().manual_seed(4)
    wv = torch.randn(heads * d, n, generator=g, dtype=torch.float64)
    wo = torch.randn(c_out, heads * d, generator=g, dtype=torch.float64)
    c = _spd(n, 80, 5)
    f = vo_factors(wv, wo, heads, cholesky(c)[0])
    v, o = vo_weights(f, rank)
    err = 0.0
    for h in range(heads):
        m = wv[h * d:(h + 1) * d].T @ wo[:, h * d:(h + 1) * d].T
        mh = v[h * rank:(h + 1) * rank].T @ o[:, h * rank:(h + 1) * rank].T
        diff = m - mh
        err += float(torch.trace(diff.T @ c @ diff))
    assert err == pytest.approx(float((f.sigma[:, rank:] ** 2).sum()), rel=1e-8, abs=1e-9)


def test_full_rank_reproduces_products_and_errors_decrease():
    heads, d, n = 2, 6, 12
    g = torch.Generator().manual_seed(7)
    wq = torch.randn(heads * d, n, generator=g, dtype=torch.float64)
    wk = torch.randn(heads * d, n, generator=g, dtype=torch.float64)
    L = cholesky(ridge(_spd(n, 50, 8), 1e-4))[0]
    f = qk_factors(wq, wk, heads, L, L)
    q, k = qk_weights(f, d)
    assert _qk_error(wq, wk, q, k, heads, torch.eye(n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)) < 1e-18
    errs = f.errors()
    assert errs[-1] == 0 and bool((errs[:-1] >= errs[1:]).all())


def test_cholesky_fallback_on_indefinite_matrix():
    from slimexport.decompose.linalg import CHOLESKY_FALLBACK_FLOOR

    # an indefinite symmetric matrix, not diagonal: Q diag(λ) Qᵀ with one slightly negative eigenvalue
    evals = torch.tensor([1.0, 0.5, 0.25, -1e-3], dtype=torch.float64)
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64))[0]
    c = q @ torch.diag(evals) @ q.T
    assert int(torch.linalg.cholesky_ex(c)[1]) != 0  # a plain Cholesky fails
    L, used = cholesky(c)
    assert used and torch.isfinite(L).all()
    # the documented fallback: C + (−λ_min + floor · |mean λ|) I, factored once
    shift = 1e-3 + CHOLESKY_FALLBACK_FLOOR * float(evals.mean().abs())
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(L @ L.T, c + shift * eye, rtol=0, atol=1e-12)
    assert torch.equal(L, torch.tril(L)) and bool((torch.diagonal(L) > 0).all())
    # the shifted matrix's smallest eigenvalue is the floor, not more
    assert float(torch.linalg.eigvalsh(L @ L.T).min()) == pytest.approx(CHOLESKY_FALLBACK_FLOOR * float(evals.mean()), rel=1e-3)
    # an SPD input is factored as it is: no fallback, no shift
    spd = _spd(4, 20, 10)
    L2, used2 = cholesky(spd)
    assert not used2
    torch.testing.assert_close(L2, torch.linalg.cholesky(spd), rtol=0, atol=0)
    torch.testing.assert_close(L2 @ L2.T, spd, rtol=1e-12, atol=1e-12)
