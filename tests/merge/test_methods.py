"""Each merge method against a small case computed by hand from its definition."""

import math

import pytest
import torch

from evomerge.merge import methods as M


def T(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def test_linear_weighted_average_and_unnormalized_sum():
    a, b = T(1, 2), T(3, 6)
    assert torch.allclose(M.linear([a, b], [1, 3]), T(2.5, 5.0))
    assert torch.allclose(M.linear([a, b], [1, 3], normalize=False), T(10, 20))


def test_task_arithmetic_adds_weighted_task_vectors_times_lambda():
    base, x1, x2 = T(1, 1), T(2, 0), T(1, 3)
    # deltas (1,-1), (0,2); 0.5*(1,-1) + (0,2) = (0.5, 1.5); lambda 2 -> (1, 3)
    assert torch.allclose(M.task_arithmetic(base, [x1, x2], [0.5, 1.0], lam=2.0), T(2, 4))


def test_ties_trims_elects_sign_and_takes_disjoint_mean():
    base = T(0, 0, 0, 0)
    x1, x2 = T(1, -2, 3, 0.5), T(-3, 1, 2, 0.1)
    # density .5 keeps the 2 largest: (0,-2,3,0) and (-3,0,2,0); weights 1, .5 -> (-1.5,0,1,0)
    # sum (-1.5,-2,4,0): signs -,-,+,(+); all kept entries agree;
    # divisor = sum of weights of agreeing non-zero entries: (.5, 1, 1.5, 0->1)
    out = M.ties(base, [x1, x2], [1.0, 0.5], [0.5, 0.5])
    assert torch.allclose(out, T(-3, -2, 4 / 1.5, 0))
    # without normalize: just the agreeing sum
    out = M.ties(base + 1, [x1 + 1, x2 + 1], [1.0, 0.5], [0.5, 0.5], normalize=False)
    assert torch.allclose(out, T(-1.5, -2, 4, 0) + 1)


def test_ties_sign_election_uses_summed_mass_not_counts():
    base = T(0)
    # two small positive deltas vs one large negative one: mass says negative
    out = M.ties(base, [T(1), T(1), T(-5)], [1, 1, 1], [1, 1, 1])
    assert torch.allclose(out, T(-5))


def test_magnitude_mask_keeps_exactly_k_even_with_ties():
    d = T(1, 1, 1, 1, 5, -5)
    mask = M.magnitude_mask(d, 0.5)  # k = 3: both 5s and one of the 1s
    assert mask.sum() == 3 and mask[4] and mask[5]
    big = torch.randn(10_001)
    mask = M.magnitude_mask(big, 0.3)
    assert mask.sum() == int(0.3 * 10_001)
    assert big[mask].abs().min() >= big[~mask].abs().max()


def test_breadcrumbs_drops_top_gamma_and_bottom_keeping_density():
    d = T(*[(-1) ** i * (i + 1) for i in range(10)])  # magnitudes 1..10
    mask = M.magnitude_outliers_mask(d, density=0.5, gamma=0.2)
    # keep 5, drop the top 2 (9, 10), so drop the bottom 3 (1, 2, 3): keep 4..8
    assert sorted(d[mask].abs().tolist()) == [4, 5, 6, 7, 8]
    out = M.breadcrumbs(torch.zeros(10), [d], [2.0], [0.5], [0.2])
    assert torch.allclose(out, 2 * d * mask)


def test_dare_keeps_density_fraction_and_rescales_to_l1_norm():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(200_000)  # a zero base keeps merged - base free of cancellation error
    ft = 0.01 * torch.randn(200_000, generator=g)
    delta = ft - base
    out = M.dare(base, [ft], [1.0], [0.3], ties=False, seed=1)
    merged = out - base
    kept = merged != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    # mergekit's rescale: the kept entries are scaled so the L1 norm equals the full delta's
    assert math.isclose(merged.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-3)
    ratio = merged[kept] / delta[kept]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert abs(ratio[0].item() * 0.3 - 1) < 0.03  # about 1/density, as in the DARE paper
    # seeded: same seed, same result; another seed, another mask
    again = M.dare(base, [ft], [1.0], [0.3], ties=False, seed=1)
    other = M.dare(base, [ft], [1.0], [0.3], ties=False, seed=2)
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_della_keep_probability_rises_with_magnitude_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 4096, generator=g)
    keep = M.della_mask(delta, density=0.5, epsilon=0.2, keys=M.stream_keys(3, 0))
    assert abs(keep.float().mean().item() - 0.5) < 0.01
    ranks = delta.abs().argsort(dim=1).argsort(dim=1).float() / 4095
    low, high = keep[ranks < 0.1].float().mean(), keep[ranks > 0.9].float().mean()
    # p = 0.3 + 0.4 * rank: about 0.32 in the bottom decile, 0.68 in the top
    assert abs(low - 0.32) < 0.02 and abs(high - 0.68) < 0.02
    with pytest.raises(ValueError, match="epsilon"):
        M.della_mask(delta, density=0.9, epsilon=0.2, keys=(0, 0))


def test_slerp_follows_the_arc_and_falls_back_to_lerp_when_colinear():
    v0, v1 = T(1, 0), T(0, 1)
    assert torch.allclose(M.slerp(0.5, v0, v1), T(math.sqrt(0.5), math.sqrt(0.5)))
    assert torch.allclose(M.slerp(0.0, v0, v1), v0) and torch.allclose(M.slerp(1.0, v0, v1), v1)
    # 90 degrees apart with different lengths: coefficients from the angle, applied to raw vectors
    assert torch.allclose(M.slerp(1 / 3, T(2, 0), T(0, 4)), T(2 * math.sin(math.pi / 3), 4 * 0.5))
    assert torch.allclose(M.slerp(0.25, T(1, 1), T(2, 2)), T(1.25, 1.25))


def test_model_stock_interpolates_by_mean_cosine():
    base = T(1, 1)
    a, b = base + T(2, 0), base + T(1, 1)
    cos = 2 / (2 * math.sqrt(2))
    t = 2 * cos / (1 + cos)
    expected = base + t * T(1.5, 0.5)
    assert torch.allclose(M.model_stock(base, [a, b]), expected)
    # orthogonal task vectors: t = 0, the base comes back
    assert torch.allclose(M.model_stock(base, [base + T(1, 0), base + T(0, 1)]), base)


def test_passthrough_shares_or_scales():
    x = T(1, -2)
    assert M.passthrough(x) is x
    assert torch.allclose(M.passthrough(x, 0.5), T(0.5, -1))


def test_inputs_are_never_modified():
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(50, generator=g) for _ in range(3))
    copies = [t.clone() for t in (base, a, b)]
    M.ties(base, [a, b], [1, 1], [0.5, 0.5])
    M.della(base, [a, b], [1, 1], [0.5, 0.5], [0.1, 0.1], seed=0)
    M.slerp(0.3, a, b)
    M.model_stock(base, [a, b])
    M.linear([a, b], [1, 2])
    assert all(torch.equal(x, y) for x, y in zip((base, a, b), copies))


# -- the methods added with mergekit 0.1.5 -------------------------------------------------------

def test_nuslerp_flattened_is_slerp_and_row_wise_interpolates_each_column():
    v0, v1 = T(1, 0, 0, 0), T(0, 1, 0, 0)
    assert torch.allclose(M.nuslerp(0.5, v0, v1), M.slerp(0.5, v0, v1))
    # rows (last axis) vs columns (first axis): row 0 is 90 degrees apart, row 1 colinear
    a = torch.tensor([[1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    rows = M.nuslerp(0.5, a, b, flatten=False)
    assert torch.allclose(rows[0], T(math.sqrt(0.5), math.sqrt(0.5)))
    assert torch.allclose(rows[1], T(1.5, 1.5))  # colinear: linear interpolation
    cols = M.nuslerp(0.5, a, b, flatten=False, row_wise=True)
    assert torch.allclose(cols, M.nuslerp(0.5, a.T, b.T, flatten=False).T)


def test_multislerp_of_two_orthogonal_unit_vectors_is_their_midpoint_on_the_arc():
    out = M.multislerp([T(1, 0), T(0, 1)], [1.0, 1.0])
    assert torch.allclose(out, T(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-6)
    # with a base the task vectors are interpolated and the base added back; norms scale the result
    base = T(1, 1)
    out = M.multislerp([base + T(2, 0), base + T(0, 2)], [3.0, 1.0], base)
    # weights 3/4, 1/4: the tangent point is the weighted mean of the unit vectors, (3/4, 1/4)
    # normalised, and the weighted tangent vectors cancel there; the norm is the weighted mean norm
    angle = math.atan2(*(out - base).flip(0).tolist())
    assert math.isclose(angle, math.atan2(0.25, 0.75), abs_tol=1e-5)
    assert math.isclose(torch.linalg.vector_norm(out - base).item(), 2.0, rel_tol=1e-5)
    single = T(4, 5)
    assert M.multislerp([single], [0.3], base) is single  # nothing to interpolate


def test_karcher_mean_of_directions_times_the_mean_norm():
    out = M.karcher([T(2, 0), T(0, 4)], max_iter=50, tol=1e-9)
    # equal weights: the direction halfway along the arc, the norm the mean of 2 and 4
    assert torch.allclose(out, 3 * T(math.sqrt(0.5), math.sqrt(0.5)), atol=1e-5)
    three = [T(1, 0, 0), T(0, 1, 0), T(0, 0, 1)]
    assert torch.allclose(M.karcher(three), torch.full((3,), 1 / math.sqrt(3)), atol=1e-5)


def test_sce_selects_varying_entries_weights_by_energy_and_erases_minority_signs():
    base = T(0, 0, 0, 0)
    a, b = T(1, 2, -1, 0.5), T(1, -4, 1, 0.5)
    out = M.sce(base, [a, b])
    wa, wb = (1 + 4 + 1 + 0.25) / 4, (1 + 16 + 1 + 0.25) / 4
    wa, wb = wa / (wa + wb), wb / (wa + wb)
    # entry 0 and 3: both agree -> weighted mean = the common value; entry 1: sum -2 -> b alone;
    # entry 2: sum 0 counts as positive -> b alone
    assert torch.allclose(out, T(1, -4, 1, 0.5))
    # select_topk is a share of the entries whose variance is non-zero (1 and 2): 0.5 keeps entry 1
    assert torch.allclose(M.sce(base, [a, b], select_topk=0.5), T(0, -4, 0, 0))
    assert torch.allclose(M.sce(base, [a, b], select_topk=0.99), T(0, -4, 0, 0))  # int(2 * 0.99) = 1
    assert wa < wb


def test_nearswap_takes_near_entries_and_moves_t_toward_far_ones():
    base, other = T(0, 0, 0), T(0.05, 1.0, -0.2)
    out = M.nearswap(base, other, t=0.1)
    # |diff| <= t: swapped whole; otherwise weight t / |diff|
    assert torch.allclose(out, T(0.05, 0.1, -0.1))


def test_arcee_fusion_keeps_only_the_outstanding_changes():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 32, generator=g)
    other = base + 1e-4 * torch.randn(64, 32, generator=g)
    other[3, 5] += 5.0  # one important change
    out = M.arcee_fusion(base, other)
    changed = (out != base)
    assert changed[3, 5] and out[3, 5] == other[3, 5]
    assert changed.float().mean() < 0.2  # most small changes are dropped


def test_ram_keeps_unique_changes_whole_and_averages_shared_ones():
    base = T(0, 0, 0, 0)
    a, b = T(1, 2, 0, 0), T(3, 0, 0, -1)
    assert torch.allclose(M.ram(base, [a, b]), T(2, 2, 0, -1))
    # RAM+: a has 1 shared, 1 unique -> rho 1, clamped to alpha 0.5 -> unique changes x (1 + 0.2 * 0.5)
    out = M.ram(base, [a, b], r=0.2, alpha=0.5)
    assert torch.allclose(out, T(2, 2 * 1.1, 0, -1 * 1.1))
    # changes at or below epsilon do not count
    assert torch.allclose(M.ram(T(0, 0), [T(1e-6, 1), T(5, 1)]), T(5, 1))


def test_new_methods_never_modify_their_inputs():
    g = torch.Generator().manual_seed(0)
    base, a, b = (torch.randn(8, 16, generator=g) for _ in range(3))
    copies = [t.clone() for t in (base, a, b)]
    M.nuslerp(0.3, a, b, flatten=False, row_wise=True)
    M.multislerp([a, b], [1, 2], base)
    M.karcher([base, a, b])
    M.sce(base, [a, b], select_topk=0.5)
    M.nearswap(base, a, 0.1)
    M.arcee_fusion(base, a)
    M.ram(base, [a, b], r=0.1)
    assert all(torch.equal(x, y) for x, y in zip((base, a, b), copies))


def test_uniform_draws_are_uniform_reproducible_and_independent_per_stream():
    a = M.uniform_draws((1000, 1000), M.stream_keys(5, 0))
    assert a.dtype == torch.float32 and 0 <= a.min() and a.max() < 1
    assert abs(a.mean().item() - 0.5) < 0.002 and abs(a.var().item() - 1 / 12) < 0.001
    # Each decile holds a tenth of the draws (a chi-square test at 9 degrees of freedom, p ~ 1e-6).
    counts = torch.histc(a, bins=10, min=0, max=1)
    assert (((counts - 1e5) ** 2) / 1e5).sum() < 45
    assert torch.equal(a, M.uniform_draws((1000, 1000), M.stream_keys(5, 0)))
    # Another model's stream, the next seed: uncorrelated draws, neighbours included.
    for other in (M.uniform_draws((1000, 1000), M.stream_keys(5, 1)), M.uniform_draws((1000, 1000), M.stream_keys(6, 0))):
        assert abs(torch.corrcoef(torch.stack([a.reshape(-1), other.reshape(-1)]))[0, 1]) < 0.005
    flat = a.reshape(-1)
    assert abs(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1]) < 0.005


def test_nuslerp_of_task_vectors_is_slerp_of_the_deltas_plus_the_base():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(300, 200, generator=g)  # above fused.MIN_FUSED: the Gram-matrix path
    a, b = base + 0.1 * torch.randn(base.shape, generator=g), base + 0.1 * torch.randn(base.shape, generator=g)
    out = M.nuslerp(0.3, a, b, base=base)
    assert torch.allclose(out, M.slerp(0.3, a - base, b - base) + base, atol=1e-6)
    # colinear task vectors: linear interpolation
    assert torch.allclose(M.nuslerp(0.25, base + (a - base), base + 2 * (a - base), base=base),
                          base + 1.25 * (a - base), atol=1e-6)
