"""The fused numba kernels give the torch reference code's results bit for bit."""

import pytest
import torch

from evomerge.merge import fused
from evomerge.merge import methods as M

pytestmark = pytest.mark.skipif(not fused.ENABLED, reason="numba not installed")


def _reference(monkeypatch, fn):
    """fn() computed by the fused kernels and by the torch code."""
    fast = fn()
    monkeypatch.setattr(fused, "ENABLED", False)
    slow = fn()
    monkeypatch.setattr(fused, "ENABLED", True)
    return fast, slow


def _bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(scope="module")
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(257, 301, generator=g)  # odd sizes: partial blocks and chunks
    fine = [base + 0.01 * torch.randn(base.shape, generator=g) for _ in range(3)]
    # Deltas on a coarse grid: many equal magnitudes straddle every threshold.
    grid = [base + torch.round(4 * torch.randn(base.shape, generator=g)) / 4 for _ in range(2)]
    return base, fine, grid


CASES = {
    "ties": lambda b, f, g: M.ties(b, f[:2], [1.0, 0.7], [0.5, 0.5]),
    "ties three models, lambda, negative weight": lambda b, f, g: M.ties(b, f, [1.0, 0.7, -0.3], [0.5, 0.2, 0.9],
                                                                         lam=1.3),
    "ties without normalize": lambda b, f, g: M.ties(b, f[:2], [1.0, 0.7], [0.3, 0.6], normalize=False),
    "ties with tied magnitudes": lambda b, f, g: M.ties(b, g, [1.0, 0.7], [0.5, 0.37]),
    "ties density 0 and 1": lambda b, f, g: M.ties(b, f[:2], [1.0, 0.7], [0.0, 1.0]),
    "ties density near 1": lambda b, f, g: M.ties(b, f[:2], [1.0, 0.7], [0.9999999, 0.999]),
    "ties density near 0": lambda b, f, g: M.ties(b, g, [1.0, 0.7], [1e-6, 0.001]),
    "task arithmetic": lambda b, f, g: M.task_arithmetic(b, f[:2], [0.6, 0.4]),
    "task arithmetic normalized, lambda": lambda b, f, g: M.task_arithmetic(b, f, [0.6, 0.4, 0.3], lam=0.8,
                                                                           normalize=True),
    "breadcrumbs": lambda b, f, g: M.breadcrumbs(b, f[:2], [0.6, 0.4], [0.9, 0.5], [0.01, 0.05]),
    "breadcrumbs_ties with tied magnitudes, one model whole": lambda b, f, g: M.breadcrumbs(
        b, g, [1.0, 0.7], [0.8, 1.0], [0.1, 0.0], ties=True, normalize=True),
    "linear": lambda b, f, g: M.linear([b] + f[:2], [1.0, 1.0, 1.0]),
    "linear unnormalized": lambda b, f, g: M.linear([b] + f[:2], [0.3, 1.7, 0.2], normalize=False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_torch_bit_for_bit(monkeypatch, tensors, case):
    base, fine, grid = tensors
    assert base.numel() >= fused.MIN_FUSED
    fast, slow = _reference(monkeypatch, lambda: CASES[case](base, fine, grid))
    assert _bits_equal(fast, slow)


def test_threshold_matches_magnitude_mask(tensors):
    base, _, grid = tensors
    n = base.numel()
    for density in (0.1, 0.37, 0.5, 0.9):
        keep = M.magnitude_mask(grid[0] - base, density)
        drop = n - max(1, int(density * n))
        t, cut = fused.magnitude_threshold(grid[0], base, drop)
        mag = (grid[0] - base).abs().reshape(-1)
        pos = torch.arange(n)
        mine = (mag > t) | ((mag == t) & (pos >= cut))
        assert torch.equal(mine, keep.reshape(-1))
        assert int(mine.sum()) == max(1, int(density * n))


def test_bracket_miss_falls_back_to_exact_select(monkeypatch, tensors):
    # A zero-width bracket around the sampled rank misses the true rank almost always.
    base, fine, _ = tensors
    monkeypatch.setattr(fused, "BRACKET", (0.0, 0))
    calls = []
    exact = fused._exact_threshold
    monkeypatch.setattr(fused, "_exact_threshold", lambda *a: calls.append(a) or exact(*a))
    for density in (0.05, 0.5, 0.95):
        fast, slow = _reference(monkeypatch, lambda: M.ties(base, fine[:2], [1.0, 0.5], [density, density]))
        assert _bits_equal(fast, slow)
    assert calls


def test_nan_deltas_take_the_torch_path(monkeypatch, tensors):
    base, fine, _ = tensors
    broken = fine[0].clone()
    broken[3, 5] = float("nan")
    assert fused.magnitude_threshold(broken, base, base.numel() // 2) is None
    fast, slow = _reference(monkeypatch, lambda: M.ties(base, [broken, fine[1]], [1.0, 1.0], [0.5, 0.5]))
    assert torch.equal(fast.isnan(), slow.isnan())
    assert torch.equal(torch.nan_to_num(fast), torch.nan_to_num(slow))


def test_inputs_are_not_modified(tensors):
    base, fine, _ = tensors
    before = [t.clone() for t in [base, *fine]]
    M.ties(base, fine, [1.0, 0.7, 0.5], [0.5, 0.5, 0.5])
    M.linear(fine, [1.0, 2.0, 3.0])
    assert all(torch.equal(a, b) for a, b in zip(before, [base, *fine]))


DROP_CASES = {
    "dare_ties": lambda b, f: M.dare(b, f[:2], [1.0, 0.7], [0.5, 0.3], ties=True, seed=11),
    "dare_linear, one model kept whole": lambda b, f: M.dare(b, f, [0.6, 0.4, 0.2], [0.5, 1.0, 0.1], ties=False,
                                                             seed=12),
    "dare without rescale": lambda b, f: M.dare(b, f[:2], [1.0, 0.7], [0.5, 0.5], ties=True, rescale=False, seed=13),
    "della": lambda b, f: M.della(b, f[:2], [1.0, 0.7], [0.5, 0.4], [0.1, 0.2], seed=14),
    "della_linear, density 0": lambda b, f: M.della(b, f[:2], [0.6, 0.4], [0.5, 0.0], [0.1, 0.1], ties=False,
                                                    normalize=False, seed=15),
}


def _noise(g, *shape, scale=0.01):
    return scale * torch.randn(*shape, generator=g)


def _pairs(g, rows, cols):
    """Every magnitude twice in a row, at random places, with random signs."""
    half = _noise(g, rows, cols // 2).repeat(1, 2)
    shuffled = half.gather(1, torch.argsort(torch.rand(rows, cols, generator=g), dim=1))
    return shuffled * (torch.randint(0, 2, (rows, cols), generator=g) * 2 - 1)


# How the fused kernel ranks a row's magnitudes: by comparisons when its buckets are small, by a
# sort when one is crowded; either way as the torch code's stable argsort ranks them.
DELLA_RANK_CASES = {
    "small buckets": lambda g: _noise(g, 257, 301),
    "pairs of equal magnitudes, small buckets": lambda g: _pairs(g, 257, 300),
    "tied magnitudes, crowded buckets": lambda g: torch.round(4 * torch.randn(257, 301, generator=g)) / 4,
    "one far outlier per row (crowded buckets)": lambda g: _noise(g, 257, 301).index_fill_(1, torch.tensor([3]), 100.0),
    "rows of equal magnitudes": lambda g: torch.full((64, 512), -0.5),
    "a few wide rows": lambda g: _noise(g, 8, 8192),
}


@pytest.mark.parametrize("case", list(DELLA_RANK_CASES))
def test_fused_della_keeps_the_entries_the_torch_code_keeps(monkeypatch, case):
    g = torch.Generator().manual_seed(1)
    delta = DELLA_RANK_CASES[case](g)
    base = torch.randn(delta.shape, generator=g)
    assert base.numel() >= fused.MIN_FUSED
    fast, slow = _reference(monkeypatch, lambda: M.della(base, [base + delta], [1.0], [0.5], [0.2], seed=16))
    assert torch.equal(fast == base, slow == base)
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", list(DROP_CASES))
def test_fused_random_drops_draw_what_the_torch_code_draws(monkeypatch, tensors, case):
    base, fine, _ = tensors
    fast, slow = _reference(monkeypatch, lambda: DROP_CASES[case](base, fine))
    # The same entries dropped (the draws are computed, not stored, in the fused kernels) ...
    assert torch.equal(fast == base, slow == base)
    # ... and the same values but for the L1 rescale factor, summed in float64 there, float32 here.
    assert torch.allclose(fast, slow, rtol=1e-6, atol=1e-7)


def test_fused_drops_of_non_finite_deltas_take_the_torch_path(monkeypatch, tensors):
    base, fine, _ = tensors
    bad = fine[0].clone()
    bad[3, 5] = float("nan")
    for fn in (lambda: M.dare(base, [bad, fine[1]], [1.0, 0.7], [0.5, 0.5], ties=True, seed=3),
               lambda: M.della(base, [bad, fine[1]], [1.0, 0.7], [0.5, 0.5], [0.1, 0.1], seed=3)):
        fast, slow = _reference(monkeypatch, fn)
        assert torch.equal(fast.isnan(), slow.isnan())
        assert torch.equal(torch.nan_to_num(fast), torch.nan_to_num(slow))


OTHER_CASES = {
    "sce": lambda b, f: M.sce(b, f, select_topk=0.5),
    "sce, every entry": lambda b, f: M.sce(b, f[:2]),
    "nuslerp with a base": lambda b, f: M.nuslerp(0.3, f[0], f[1], base=b),
    "multislerp": lambda b, f: M.multislerp(f, [0.5, 0.3, 0.2], b),
    "karcher": lambda b, f: M.karcher(f),
    "ram": lambda b, f: M.ram(b, f[:2]),
    "nearswap": lambda b, f: M.nearswap(b, f[0], 0.001),
}


@pytest.mark.parametrize("case", list(OTHER_CASES))
def test_fused_kernels_of_the_other_methods_agree_with_the_torch_code(monkeypatch, tensors, case):
    base, fine, _ = tensors
    fast, slow = _reference(monkeypatch, lambda: OTHER_CASES[case](base, fine))
    # float64 accumulation in the kernels where torch sums in float32: equal to float32 rounding
    assert torch.allclose(fast, slow, rtol=1e-5, atol=1e-6)


def test_fused_row_kl_is_the_float64_kl_of_the_row_softmaxes(tensors):
    base, fine, _ = tensors
    p = torch.softmax(fine[0].double(), dim=-1) + 1e-8
    q = torch.softmax(base.double(), dim=-1) + 1e-8
    exact = (p * torch.log(p / q)).sum(dim=-1)
    assert torch.allclose(fused.row_kl(base, fine[0]).double(), exact, rtol=1e-6, atol=0)


def test_fused_arcee_fusion_keeps_what_the_torch_code_keeps(monkeypatch, tensors):
    base, fine, _ = tensors
    fast, slow = _reference(monkeypatch, lambda: M.arcee_fusion(base, fine[0], torch.Generator().manual_seed(4)))
    kept = fast != base
    assert 0.01 < kept.float().mean() < 0.5
    # the torch code's softmax is float32: an importance within its rounding of the threshold may differ
    assert (kept != (slow != base)).float().mean() < 1e-3
    assert torch.equal(fast[kept], fine[0][kept])


def test_fused_sampled_importances_are_the_torch_codes_in_another_order():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(1200, 1100, generator=g)
    b = a + 0.01 * torch.randn(a.shape, generator=g)
    kl = fused.row_kl(a, b).reshape(-1, 1)
    idx = torch.randint(a.numel(), (300_000,), generator=g)
    expected = (b.reshape(-1)[idx] - a.reshape(-1)[idx]).abs() * kl.reshape(-1)[idx // a.shape[-1]]
    got = fused.sampled_importance(a, b, kl, idx)
    assert torch.equal(got.sort().values, expected.sort().values)
