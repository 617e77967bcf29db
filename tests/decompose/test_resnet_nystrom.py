import pytest
import torch

from slimexport.decompose.resnet_nystrom import (
    fold_conv2,
    group_pivoted_order,
    kept_channels,
    reconstruction,
    residual,
)


def _corr(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(400, n, generator=g, dtype=torch.float64) @ torch.randn(n, n, generator=g, dtype=torch.float64)
    return x, x.T @ x


def test_all_groups_reproduce_conv2_exactly():
    _, c = _corr(24)
    order = group_pivoted_order(c, 4)
    assert sorted(order.tolist()) == list(range(6))
    keep = kept_channels(order, 6, 4)
    w2 = torch.randn(5, 24, 3, 3, dtype=torch.float64)
    assert torch.allclose(fold_conv2(w2, reconstruction(c, keep)), w2, atol=1e-9)
    assert abs(residual(c, keep, w2)) < 1e-6


def _greedy_groups(c, group_size, count):
    """By hand: repeatedly take the group with the largest trace of its Schur complement given the groups taken."""
    taken = []
    for _ in range(count):
        best, best_tr = None, -float("inf")
        for g in range(c.shape[0] // group_size):
            if g in taken:
                continue
            gi = list(range(g * group_size, (g + 1) * group_size))
            sc = c[gi][:, gi]
            if taken:
                si = [g2 * group_size + j for g2 in taken for j in range(group_size)]
                sc = sc - c[gi][:, si] @ torch.linalg.solve(c[si][:, si], c[si][:, gi])
            if float(torch.trace(sc)) > best_tr:
                best, best_tr = g, float(torch.trace(sc))
        taken.append(best)
    return taken


def test_kept_channels_are_whole_groups():
    _, c = _corr(24, 1)
    order = group_pivoted_order(c, 4)
    assert order.tolist() == _greedy_groups(c, 4, 6)
    keep = kept_channels(order, 3, 4)
    assert keep.shape == (12,)  # 3 groups of 4
    groups = keep.reshape(-1, 4)
    assert len(groups) == 3
    assert all(int(g[0]) % 4 == 0 and g.tolist() == list(range(int(g[0]), int(g[0]) + 4)) for g in groups)
    # which groups: the first three of the greedy order, in channel order
    assert [int(g[0]) // 4 for g in groups] == sorted(order[:3].tolist())
    assert torch.equal(keep, torch.tensor([4 * g + j for g in sorted(order[:3].tolist()) for j in range(4)]))


def test_fold_is_least_squares_through_a_convolution():
    """Folding T into conv2 equals conv2 applied to the reconstructed channels, pixel by pixel."""
    x, c = _corr(16, 2)
    h = x[:64].T.reshape(1, 16, 8, 8)  # 16 channels on an 8×8 image
    keep = kept_channels(group_pivoted_order(c, 4), 2, 4)
    t = reconstruction(c, keep)
    w2 = torch.randn(3, 16, 3, 3, dtype=torch.float64)
    recon = torch.einsum("cs,bshw->bchw", t, h[:, keep])
    direct = torch.nn.functional.conv2d(recon, w2, padding=1)
    folded = torch.nn.functional.conv2d(h[:, keep], fold_conv2(w2, t), padding=1)
    assert torch.allclose(direct, folded, atol=1e-9)


@pytest.mark.parametrize("keep_groups", [1, 3, 5])
def test_errors_shrink_as_groups_are_added(keep_groups):
    _, c = _corr(24, 3)
    order = group_pivoted_order(c, 4)
    w2 = torch.randn(4, 24, 3, 3, dtype=torch.float64)
    e_now = residual(c, kept_channels(order, keep_groups, 4), w2)
    e_more = residual(c, kept_channels(order, keep_groups + 1, 4), w2)
    assert e_more <= e_now + 1e-6 * abs(e_now)


def test_groupnorm_statistics_of_kept_groups_unchanged(tiny, tiny_stats):
    """The slim block's norm2 output on its kept channels equals the dense block's on the same channels."""
    from slimexport.allocate.api import plan_ranks
    from slimexport.config import AllocConfig, DecomposeConfig
    from slimexport.decompose.api import slim_unet

    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=0.6, targets=("resnet",)))
    slim, _ = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    r = tiny_stats.resnets[0]
    dense_b, slim_b = tiny.unet.get_submodule(r.path), slim.get_submodule(r.path)
    keep_rows = [int((dense_b.conv1.bias == b).nonzero()[0, 0]) for b in slim_b.conv1.bias]
    x = torch.randn(2, r.in_channels, 8, 8)
    temb = torch.randn(2, r.temb_dim)

    def inner(block):
        h = block.conv1(block.nonlinearity(block.norm1(x))) + block.time_emb_proj(block.nonlinearity(temb))[:, :, None, None]
        return block.norm2(h)

    assert slim_b.conv1.out_channels < dense_b.conv1.out_channels
    assert torch.allclose(inner(slim_b), inner(dense_b)[:, keep_rows], atol=1e-5)


def test_full_budget_with_resnets_reproduces_dense(tiny, tiny_stats, tiny_inputs):
    from slimexport.allocate.api import plan_ranks
    from slimexport.config import AllocConfig, DecomposeConfig
    from slimexport.decompose.api import slim_unet

    plan = plan_ranks(tiny.unet, tiny_stats, DecomposeConfig(), AllocConfig(budget=1.0, targets=("attn", "ffn", "resnet")))
    slim, _ = slim_unet(tiny.unet, tiny_stats, plan, DecomposeConfig(), progress=False)
    x, ctx, ts = tiny_inputs
    for t in ts[:2]:
        a, b = slim(x, torch.full((4,), t), ctx).sample, tiny.unet(x, torch.full((4,), t), ctx).sample
        assert float((a - b).norm() / b.norm()) < 1e-5
