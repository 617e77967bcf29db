import pytest
import torch

from slimexport.decompose.ffn_nystrom import (
    ffn_slim_weights,
    kept_channels,
    leverage_order,
    nystrom_errors,
    pivoted_cholesky_order,
    residual,
    total_energy,
)


def _setup(m=48, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(300, m, generator=g, dtype=torch.float64) @ torch.randn(m, m, generator=g, dtype=torch.float64)
    w1 = torch.randn(2 * m, c, generator=g, dtype=torch.float64)
    b1 = torch.randn(2 * m, generator=g, dtype=torch.float64)
    w2 = torch.randn(c, m, generator=g, dtype=torch.float64)
    return z, z.T @ z, w1, b1, w2


def test_all_columns_is_exact():
    z, c, w1, b1, w2 = _setup()
    order = pivoted_cholesky_order(c)
    nw1, nb1, nw2 = ffn_slim_weights(w1, b1, w2, c, order, w2.shape[1])
    assert torch.equal(nw1, w1) and torch.equal(nb1, b1)
    assert torch.allclose(nw2, w2, atol=1e-9)


@pytest.mark.parametrize("width", [4, 16, 40])
def test_residual_formula_matches_least_squares_error(width):
    z, c, w1, b1, w2 = _setup()
    order = pivoted_cholesky_order(c)
    _, _, nw2 = ffn_slim_weights(w1, b1, w2, c, order, width)
    keep = torch.sort(order[:width]).values
    measured = float(((z @ w2.T - z[:, keep] @ nw2.T) ** 2).sum())
    assert measured == pytest.approx(nystrom_errors(c, order, w2, [width])[width], rel=1e-6)
    # the decomposition's own error, read from the down-projection it just solved for (no second solve)
    assert measured == pytest.approx(residual(c, kept_channels(order, width), nw2, total_energy(c, w2)), rel=1e-6)
    assert total_energy(c, w2) == pytest.approx(float(((z @ w2.T) ** 2).sum()), rel=1e-9)


def test_pivots_are_nested_and_greedy_on_diagonal():
    _, c, *_ = _setup()
    order = pivoted_cholesky_order(c)
    assert sorted(order.tolist()) == list(range(c.shape[0]))
    assert int(order[0]) == int(torch.argmax(torch.diagonal(c)))
    # every later pivot is greedy too: the channel with the largest residual variance given the channels before it,
    # diag(C − C[:,S] C[S,S]⁻¹ C[S,:]) (by hand, with explicit solves)
    for k in range(1, c.shape[0]):
        s = order[:k]
        res = torch.diagonal(c - c[:, s] @ torch.linalg.solve(c[s][:, s], c[s, :])).clone()
        res[s] = -float("inf")
        assert float(res[int(order[k])]) >= float(res.max()) * (1 - 1e-8), k
    # and it is not simply the diagonal's order (the test would not tell the two apart otherwise)
    assert order.tolist() != torch.argsort(torch.diagonal(c), descending=True).tolist()


def test_errors_never_increase_with_width():
    _, c, _, _, w2 = _setup(seed=3)
    for order in (pivoted_cholesky_order(c), leverage_order(c)):
        errs = nystrom_errors(c, order, w2, list(range(1, 49)))
        vals = [errs[r] for r in range(1, 49)]
        assert all(a >= b - 1e-6 * vals[0] for a, b in zip(vals, vals[1:]))
        assert vals[-1] == 0.0
