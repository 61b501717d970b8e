"""Merge methods: pure functions over the tensors of one parameter.

Semantics, parameter names and defaults follow mergekit 0.1.5, so a recipe
means the same thing here. The code is written for speed: top-k selection by
a two-pass radix select on float bit patterns (linear time, exact) instead of
a full argsort, sign election in a few vectorised passes, and in-place ops on
freshly allocated deltas only (inputs are never modified -- they may be
resident source weights).

All arithmetic happens in float32 (float64 if the inputs are float64); the
result is cast back to the inputs' dtype by the engine.

Which parameters each method takes (scope, default, range, search bounds) and how
the engine calls it is declared once per method in ``evomerge.merge.registry``.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Tensor

from evomerge.merge import fused

# -- helpers --------------------------------------------------------------------------------

def work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _f(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _kth_smallest_bits(bits: Tensor, k: int) -> tuple[int, int, int]:
    """The k-th smallest (0-based) of non-negative int32 ``bits``: (value, #smaller, #equal).

    Two radix passes over 15 + 16 bits (bit patterns of non-negative floats sort like the floats),
    linear time instead of a sort.
    """
    flat = bits.reshape(-1)
    if flat.numel() <= 1 << 16:  # small tensors (norms): a sort beats two 32K-64K-bin histograms
        ordered = flat.sort().values
        value = ordered[k]
        below = int(torch.searchsorted(ordered, value))
        return int(value), below, int(torch.searchsorted(ordered, value, right=True)) - below
    high = flat >> 16
    counts = torch.bincount(high, minlength=1 << 15).cumsum_(0)
    bucket = int(torch.searchsorted(counts, k, right=True))
    below = int(counts[bucket - 1]) if bucket else 0
    low = flat[high == bucket] & 0xFFFF
    counts = torch.bincount(low, minlength=1 << 16).cumsum_(0)
    sub = int(torch.searchsorted(counts, k - below, right=True))
    before = int(counts[sub - 1]) if sub else 0
    return (bucket << 16) | sub, below + before, int(counts[sub]) - before


def _rank_below(bits: Tensor, r: int) -> Tensor:
    """Mask of the ``r`` smallest elements (ties broken by position)."""
    n = bits.numel()
    if r <= 0:
        return torch.zeros_like(bits, dtype=torch.bool)
    if r >= n:
        return torch.ones_like(bits, dtype=torch.bool)
    value, below, equal = _kth_smallest_bits(bits, r - 1)
    if below + equal == r:  # no tie straddles the cut
        return bits <= value
    mask = bits < value
    idx = (bits == value).reshape(-1).nonzero().squeeze(1)[: r - below]
    mask.view(-1)[idx] = True
    return mask


def _rank_at_least(bits: Tensor, r: int) -> Tensor:
    """Mask of all but the ``r`` smallest elements (ties broken by position, as ``_rank_below``)."""
    return ~_rank_below(bits, r)


def _magnitude_bits(x: Tensor) -> Tensor:
    # mergekit ranks float32 magnitudes on CPU; int32 views of non-negative floats keep their order.
    return x.abs().float().view(torch.int32)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (TIES "trim")."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    return _rank_at_least(_magnitude_bits(delta), n - k)


def magnitude_outliers_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Breadcrumbs: drop the ``int(gamma*n)`` largest, then the smallest, keeping ``int(density*n)``."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    n_bot = max(0, n - keep - int(gamma * n))
    bits = _magnitude_bits(delta)
    return _rank_below(bits, n_bot + keep) & ~_rank_below(bits, n_bot)


# -- random draws ----------------------------------------------------------------------------
# DARE and DELLA draw one uniform per entry from a counter-based generator: the draw of entry j
# is a hash of (j, the tensor's stream key), so the fused kernels compute it where they use it
# (no tensor of draws is materialised) and every implementation -- torch here, numba in
# ``fused`` -- gives the same draws. The hash is two rounds of Wellons' "lowbias32" integer
# hash (a bijection on 32 bits); the top 24 bits give a float32 in [0, 1), as torch.rand does.

MASK32 = 0xFFFFFFFF
HASH_MULTIPLIERS = fused.HASH_MULTIPLIERS  # one definition, read by the numba kernels too


def stream_keys(seed: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys for draw stream ``stream`` (the model's position) of a tensor's ``seed``
    (splitmix64 of both, so nearby seeds give unrelated keys)."""
    z = (seed * 0x9E3779B97F4A7C15 + (stream + 1) * 0xD1B54A32D192ED03) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z & MASK32, z >> 32


def _mulmod32(x: Tensor, c: int) -> Tensor:
    # x * c mod 2^32 in int64 without overflow (torch has no unsigned 32/64-bit multiply):
    # split c into 16-bit halves, so each product stays below 2^48.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def _lowbias32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mulmod32(x, HASH_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _mulmod32(x, HASH_MULTIPLIERS[1])
    return x ^ (x >> 16)


def uniform_draws(shape: torch.Size | tuple[int, ...], keys: tuple[int, int], device=None) -> Tensor:
    """float32 uniforms in [0, 1), entry j (row-major) = draw(j, keys); up to 2^32 entries."""
    n = math.prod(shape)
    if n > 2**32:
        raise ValueError(f"a tensor of {n} entries is beyond the 2^32 draws of one stream")
    j = torch.arange(n, dtype=torch.int64, device=device)
    h = _lowbias32(_lowbias32(j ^ keys[0]) ^ keys[1])
    return ((h >> 8).to(torch.float32) * 2.0**-24).reshape(shape)


def _draw_seed(seed: int | None) -> int:
    return random.SystemRandom().randrange(2**63) if seed is None else seed


def random_mask(delta: Tensor, density: float, keys: tuple[int, int]) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return uniform_draws(delta.shape, keys, delta.device) < density


def della_mask(delta: Tensor, density: float, epsilon: float, keys: tuple[int, int]) -> Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with magnitude rank,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    _check_della(density, epsilon)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    mags = _f(rows).abs()
    order = torch.argsort(mags, dim=1, stable=True)  # equal magnitudes ranked in position order
    n = rows.shape[1]
    ranks = torch.empty_like(mags)
    ranks.scatter_(1, order, torch.arange(n, dtype=mags.dtype, device=mags.device).expand_as(mags))
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(mags, float("nan"))
    probs = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    keep = uniform_draws(probs.shape, keys, probs.device) < probs
    return keep.reshape(delta.shape)


def _check_della(density: float, epsilon: float) -> None:
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"density {density} +/- epsilon {epsilon} must stay inside (0, 1)")


def rescale_l1_(masked: Tensor, original_l1: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale ``masked`` in place so its L1 norm matches the unmasked tensor's (mergekit's rescale)."""
    after = masked.abs().sum()
    if original_l1 >= eps and after >= eps:
        masked.mul_(original_l1 / after)
    return masked


# -- methods ---------------------------------------------------------------------------------

def linear(tensors: list[Tensor], weights: list[float], normalize: bool = True) -> Tensor:
    """Weighted average (model soup): sum(w_i x_i), divided by sum(w_i) when ``normalize``."""
    if normalize and sum(weights) == 0:
        raise ValueError("linear weights sum to 0 with normalize: true")
    if tensors[0].numel() >= fused.MIN_FUSED and fused.usable(*tensors):
        return fused.linear(tensors, weights, normalize, sum(weights))
    out = _f(tensors[0]).mul(weights[0])
    for x, w in zip(tensors[1:], weights[1:]):
        out.add_(_f(x), alpha=w)
    if normalize:
        total = sum(weights)
        if total == 0:
            raise ValueError("linear weights sum to 0 with normalize: true")
        out.div_(total)
    return out


def generalized_task_arithmetic(
    base: Tensor,
    tensors: list[Tensor],
    weights: list[float],
    densities: list[float] | None = None,
    *,
    sparsify: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lam: float = 1.0,
    gammas: list[float] | None = None,
    epsilons: list[float] | None = None,
    seed: int | None = None,
) -> Tensor:
    """base + lam * combine(w_i * sparsify(x_i - base)), the family behind task arithmetic,
    TIES, DARE, breadcrumbs and DELLA.

    With ``consensus='sum'`` (TIES) each entry keeps only the deltas whose sign agrees
    with the sign of the summed weighted deltas; ``normalize`` then divides by the sum
    of the weights of the agreeing (non-zero) deltas, otherwise by the sum of all weights.
    """
    densities = densities or [1.0] * len(tensors)
    b = _f(base)
    if not tensors:
        return b.clone()
    if sparsify in ("random", "della_magprune"):
        seed = _draw_seed(seed)  # once: the fused kernels and the torch code below draw alike
    if base.numel() >= fused.MIN_FUSED and fused.usable(base, *tensors):
        out = None
        if sparsify in (None, "magnitude") and not (rescale and sparsify):
            out = _fused_gta(base, tensors, weights, densities, sparsify, consensus, normalize, lam)
        elif sparsify == "magnitude_outliers" and not rescale:
            out = _fused_band(base, tensors, weights, densities, gammas or [0.01] * len(tensors), consensus,
                              normalize, lam)
        elif sparsify in ("random", "della_magprune"):
            out = _fused_drop(base, tensors, weights, densities, sparsify, consensus, normalize, rescale, lam,
                              epsilons or [0.15] * len(tensors), seed)
        if out is not None:
            return out
    deltas: list[Tensor] = []
    for i, x in enumerate(tensors):
        d = _f(x) - b  # fresh tensor: safe to modify in place
        density = densities[i]
        if sparsify is not None and density < 1:
            if sparsify == "magnitude":
                keep = magnitude_mask(d, density)
            elif sparsify == "random":
                keep = random_mask(d, density, stream_keys(seed, i))
            elif sparsify == "magnitude_outliers":
                keep = magnitude_outliers_mask(d, density, (gammas or [0.01] * len(tensors))[i])
            elif sparsify == "della_magprune":
                keep = della_mask(d, density, (epsilons or [0.15] * len(tensors))[i], stream_keys(seed, i))
            else:
                raise ValueError(f"unknown sparsification {sparsify!r}")
            l1 = d.abs().sum() if rescale else None
            d = torch.where(keep, d, 0.0)
            del keep
            if rescale:
                rescale_l1_(d, l1)
        if weights[i] != 1:
            d.mul_(weights[i])
        deltas.append(d)

    if consensus == "sum":
        # Majority sign of the summed weighted deltas (ties count as positive).
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
        mixed = total.zero_()
        divisor = torch.zeros_like(mixed) if normalize else None
        for d, w in zip(deltas, weights):
            agree = d.mul(majority) > 0  # sign(d) == majority; zero deltas never agree
            mixed.add_(torch.where(agree, d, 0.0))
            if normalize:
                divisor.add_(torch.where(agree, w, 0.0).to(divisor.dtype))
        if normalize:
            divisor.masked_fill_(divisor == 0, 1)
            mixed.div_(divisor)
    else:
        mixed = deltas[0]
        for d in deltas[1:]:
            mixed.add_(d)
        if normalize:
            divisor = sum(weights)
            if abs(divisor) < 1e-8:
                divisor = 1.0
            mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(b)


def _fused_gta(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
               sparsify: str | None, consensus: str | None, normalize: bool, lam: float) -> Tensor | None:
    """The same computation as the torch code, fused into one pass (None: take the torch path)."""
    n = base.numel()
    keeps = []
    for x, density in zip(tensors, densities):
        if sparsify is None or density >= 1:
            keeps.append(fused.Keep(fused.ALL))
            continue
        drop = n - max(1, int(density * n)) if density > 0 else n
        if drop <= 0:
            keeps.append(fused.Keep(fused.ALL))
        elif drop >= n:
            keeps.append(fused.Keep(fused.TOP, (math.inf, n)))
        else:
            t = fused.magnitude_threshold(x, base, drop)
            if t is None:  # NaN deltas: the torch code defines what happens
                return None
            keeps.append(fused.Keep(fused.TOP, t))
    return fused.gta(base, tensors, weights, keeps, consensus == "sum", normalize, lam)


def _fused_band(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
                gammas: list[float], consensus: str | None, normalize: bool, lam: float) -> Tensor | None:
    """Breadcrumbs fused: the kept rank band [n_bot, n_bot + keep) as two magnitude thresholds."""
    n = base.numel()
    keeps = []
    for x, density, gamma in zip(tensors, densities, gammas):
        if density >= 1:
            keeps.append(fused.Keep(fused.ALL))
            continue
        keep = int(density * n)
        n_bot = max(0, n - keep - int(gamma * n))
        edges = []
        for r in (n_bot, n_bot + keep):  # the r smallest fall below the edge
            if r <= 0:
                edges.append((-math.inf, 0))
            elif r >= n:
                edges.append((math.inf, n))
            else:
                t = fused.magnitude_threshold(x, base, r)
                if t is None:
                    return None
                edges.append(t)
        keeps.append(fused.Keep(fused.BAND, *edges))
    return fused.gta(base, tensors, weights, keeps, consensus == "sum", normalize, lam)


def _fused_drop(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float], sparsify: str,
                consensus: str | None, normalize: bool, rescale: bool, lam: float, epsilons: list[float],
                seed: int) -> Tensor | None:
    """DARE and DELLA fused: per model one pass for its L1 sums (and DELLA's keep mask: DARE's
    draws are recomputed in the merge pass, not stored), then one pass for the merge. The draws
    are the torch code's (``uniform_draws``). None: the torch code decides (a delta that is not
    finite, or DELLA rows of one entry)."""
    keeps = []
    for i, (x, density, epsilon) in enumerate(zip(tensors, densities, epsilons)):
        key = stream_keys(seed, i)
        if density >= 1:
            keeps.append(fused.Keep(fused.ALL))
        elif sparsify == "della_magprune" and density <= 0:
            keeps.append(fused.Keep(fused.DRAW, keys=key, density=-1.0))  # nothing kept
        elif sparsify == "random":
            total, kept = fused.draw_l1(x, base, key, density)
            if not math.isfinite(total):
                return None
            keeps.append(fused.Keep(fused.DRAW, keys=key, density=density,
                                    scale=_rescale_factor(total, kept) if rescale else 1.0))
        else:
            _check_della(density, epsilon)
            decided = fused.della_keep(x, base, key, density, epsilon)
            if decided is None:
                return None
            mask, total, kept = decided
            keeps.append(fused.Keep(fused.MASK, mask=mask, scale=_rescale_factor(total, kept) if rescale else 1.0))
    return fused.gta(base, tensors, weights, keeps, consensus == "sum", normalize, lam)


def _rescale_factor(total: float, kept: float) -> float:
    # mergekit's rescale, in float32 as rescale_l1_ computes it
    if total >= 1e-7 and kept >= 1e-7:
        return float(torch.tensor(total, dtype=torch.float32) / torch.tensor(kept, dtype=torch.float32))
    return 1.0


def task_arithmetic(base: Tensor, tensors: list[Tensor], weights: list[float], lam: float = 1.0,
                    normalize: bool = False) -> Tensor:
    """base + lam * sum_i w_i (x_i - base)."""
    return generalized_task_arithmetic(base, tensors, weights, normalize=normalize, lam=lam)


def ties(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
         normalize: bool = True, lam: float = 1.0) -> Tensor:
    """TIES: trim each task vector to its top-density magnitudes, elect signs, disjoint mean."""
    return generalized_task_arithmetic(base, tensors, weights, densities, sparsify="magnitude",
                                       consensus="sum", normalize=normalize, lam=lam)


def dare(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float], *,
         ties: bool, normalize: bool = False, rescale: bool = True, lam: float = 1.0,
         seed: int | None = None) -> Tensor:
    """DARE: random drop with keep probability ``density``, L1 rescale; TIES sign election if ``ties``."""
    return generalized_task_arithmetic(base, tensors, weights, densities, sparsify="random",
                                       consensus="sum" if ties else None, normalize=normalize,
                                       rescale=rescale, lam=lam, seed=seed)


def breadcrumbs(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
                gammas: list[float], *, ties: bool = False, normalize: bool = False, lam: float = 1.0) -> Tensor:
    """Model breadcrumbs: drop the top-gamma outliers and the smallest, keep ``density``."""
    return generalized_task_arithmetic(base, tensors, weights, densities, sparsify="magnitude_outliers",
                                       consensus="sum" if ties else None, normalize=normalize,
                                       lam=lam, gammas=gammas)


def della(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
          epsilons: list[float], *, ties: bool = True, normalize: bool = True, rescale: bool = True,
          lam: float = 1.0, seed: int | None = None) -> Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune), L1 rescale, optional sign election."""
    return generalized_task_arithmetic(base, tensors, weights, densities, sparsify="della_magprune",
                                       consensus="sum" if ties else None, normalize=normalize,
                                       rescale=rescale, lam=lam, epsilons=epsilons, seed=seed)


def slerp(t: float, v0: Tensor, v1: Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> Tensor:
    """Spherical interpolation from ``v0`` (t=0, the base) to ``v1`` (t=1) over the flattened
    tensors; near-colinear (|cos| > dot_threshold) pairs fall back to linear interpolation."""
    a, b = _f(v0), _f(v1)
    na = torch.linalg.vector_norm(a)
    nb = torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1)) if a.numel() else 1.0
    if abs(dot) > dot_threshold:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return a.mul(ca).add_(b, alpha=cb)


def model_stock(base: Tensor, tensors: list[Tensor], filter_wise: bool = False) -> Tensor:
    """Model Stock: move from the base toward the average of the fine-tunes by
    t = k cos / (1 + (k - 1) cos), cos = mean pairwise cosine of their task vectors."""
    b = _f(base)
    shape = b.shape
    if filter_wise:
        rows = b.reshape(1, -1) if b.dim() == 1 else b.reshape(b.shape[0], -1)
        deltas = [(_f(x).reshape(rows.shape) - rows) for x in tensors]
    else:
        rows = b.reshape(1, -1)
        deltas = [(_f(x).reshape(1, -1) - rows) for x in tensors]
    cos = []
    for i, da in enumerate(deltas):
        for db in deltas[i + 1:]:
            norm = torch.linalg.vector_norm(da, dim=-1) * torch.linalg.vector_norm(db, dim=-1)
            cos.append(((da * db).sum(dim=-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(tensors)
    denom = 1 + (k - 1) * cos_theta
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), k * cos_theta / torch.where(singular, 1.0, denom))
    avg = torch.stack(deltas).mean(dim=0)  # average of fine-tunes = base + mean delta
    return rows.add(avg.mul_(t)).reshape(shape)


def passthrough(tensor: Tensor, scale: float | None = None) -> Tensor:
    """The tensor unchanged (shared, not copied), or multiplied by ``scale``."""
    return tensor if scale is None else _f(tensor) * scale


# -- spherical and consensus methods added with mergekit 0.1.5 ---------------------------------

def nuslerp(t: float, v0: Tensor, v1: Tensor, *, base: Tensor | None = None, row_wise: bool = False,
            flatten: bool = True, eps: float = 1e-8) -> Tensor:
    """SLERP from ``v0`` (t=0) to ``v1`` (t=1) over whole tensors (``flatten``), over each
    row (the last axis), or over each column (``row_wise``, the first axis); with a ``base``,
    of the task vectors ``v - base``, the base added back.

    Coefficients come from the angle between the unit vectors and multiply the raw vectors;
    pairs with 1 - cos^2 <= eps^2 are interpolated linearly.
    """
    if flatten:  # two coefficients from the Gram matrix (one pass), then one weighted sum
        g = _gram([v0, v1], base)
        na, nb = (max(math.sqrt(max(g[i, i], 0.0)), 1e-7) for i in (0, 1))
        cos = min(max(g[0, 1] / (na * nb), -1.0), 1.0)
        if 1 - cos * cos <= eps * eps:
            coefs = [1 - t, t]
        else:
            theta = math.acos(cos)
            coefs = [math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)]
        return _combine([v0, v1], base, np.array(coefs))
    if base is not None:
        b = _f(base)
        return nuslerp(t, _f(v0) - b, _f(v1) - b, row_wise=row_wise, flatten=False, eps=eps).add_(b)
    a, b = _f(v0), _f(v1)
    shape = a.shape
    if row_wise:
        a, b = a.transpose(0, -1), b.transpose(0, -1)
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=-1, keepdim=True).clamp(-1, 1)
    del ua, ub
    colinear = (1 - cos * cos) <= eps * eps
    # acos(0) on the colinear rows keeps sin(theta) away from 0; their result is replaced below.
    theta = torch.acos(torch.where(colinear, 0.0, cos).to(cos.dtype))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * a + t * b, out)
    if row_wise:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(tensors: list[Tensor], weights: list[float], base: Tensor | None = None, *,
               normalize_weights: bool = True, eps: float = 1e-8) -> Tensor:
    """Barycentric interpolation on the hypersphere (task vectors when ``base`` is given).

    The unit vectors' weighted mean, projected back on the sphere, is the tangent point;
    the weighted mean of the inputs' tangent-space projections is mapped back with the
    exponential map and scaled by the weighted mean of the input norms. A single input is
    returned as it is (mergekit: no interpolation, the base is not added back).

    Every vector involved is a combination of the inputs, so the whole computation runs on
    their Gram matrix (one pass) and the result is one weighted sum (a second pass).
    """
    if len(tensors) == 1:
        return tensors[0]
    g = _gram(tensors, base)
    w = np.array(weights, dtype=np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    a = w / (norms + eps)  # the weighted mean of the unit vectors, as coefficients of the inputs
    mean_norm = _norm(a, g)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("the weighted sum of the inputs' directions is zero (antipodal inputs "
                             "with balancing weights); change the weights")
        return _combine(tensors, base, w)
    m = a / mean_norm
    along = (g @ m) / (norms + eps)  # each unit vector's component along the tangent point
    step = a - float(w @ along) * m  # sum_i w_i (u_i - (u_i . mean) mean)
    step_norm = _norm(step, g) + eps
    out = m * math.cos(step_norm) + step * (math.sin(step_norm) / step_norm)
    return _combine(tensors, base, out * float(norms @ w))


def _gram(tensors: list[Tensor], base: Tensor | None) -> np.ndarray:
    """Dot products of the inputs (their deltas from ``base``), in float64."""
    if tensors[0].numel() >= fused.MIN_FUSED and fused.usable(*tensors, *([base] if base is not None else [])):
        return fused.gram(tensors, base)
    x = torch.stack([_f(t).reshape(-1).double() for t in tensors])
    if base is not None:
        x.sub_(_f(base).reshape(-1).double())
    return (x @ x.T).numpy()


def _combine(tensors: list[Tensor], base: Tensor | None, coefs: np.ndarray) -> Tensor:
    """``base + sum_i c_i (x_i - base)``, or ``sum_i c_i x_i`` without a base."""
    if tensors[0].numel() >= fused.MIN_FUSED and fused.usable(*tensors, *([base] if base is not None else [])):
        return fused.affine(tensors, base, coefs)
    dtype = work_dtype(tensors[0].dtype)
    b = None if base is None else _f(base).double()
    out = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for x, c in zip(tensors, coefs.tolist()):
        out.add_(_f(x).double() if b is None else _f(x).double() - b, alpha=c)
    return (out if b is None else out.add_(b)).to(dtype)


def _norm(coefs: np.ndarray, g: np.ndarray) -> float:
    """The norm of ``sum_i c_i x_i`` from the inputs' Gram matrix."""
    return math.sqrt(max(float(coefs @ g @ coefs), 0.0))


def karcher(tensors: list[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """The Karcher (Riemannian) mean of the inputs' directions on the unit sphere, equal
    weights, by fixed-point iteration; scaled by the mean input norm. Inputs with norm
    <= ``tol`` do not pull the direction but still count in the norm's mean.

    The mean stays a combination of the unit vectors, so the iteration runs on their
    k x k Gram matrix (one pass over the inputs), then one weighted sum makes the result.
    """
    if len(tensors) == 1:
        return tensors[0]
    g = _gram(tensors, None)
    alpha = 1.0 / len(tensors)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(tensors[0].shape, dtype=work_dtype(tensors[0].dtype))
    nv = norms[valid]
    gu = g[np.ix_(valid, valid)] / np.outer(nv, nv)  # Gram matrix of the unit vectors
    share = np.full(len(valid), 1.0 / len(valid))
    c = share.copy()  # the mean as coefficients of the unit vectors
    mean_norm = _norm(c, gu)
    if mean_norm < tol:
        c = np.eye(len(valid))[0]
    else:
        c /= mean_norm
    for _ in range(max_iter):
        dots = np.clip(gu @ c, -1.0, 1.0)
        theta = np.arccos(dots)
        # log map: sum_i w_i theta_i / sin(theta_i) (u_i - dot_i mean), inputs at the mean left out
        with np.errstate(invalid="ignore", divide="ignore"):
            coef = np.where(theta >= tol, share * theta / np.sin(theta), 0.0)
        tangent = coef - float(coef @ dots) * c
        tangent_norm = _norm(tangent, gu)
        if tangent_norm < tol:
            break
        c = c * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
        unit_norm = _norm(c, gu)
        if unit_norm > tol:
            c /= unit_norm
    scale = float(alpha * norms.sum())
    coefs = np.zeros(len(tensors))
    coefs[valid] = scale * c / nv
    return _combine(tensors, None, coefs)


def sce(base: Tensor, tensors: list[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """SCE: Select the entries where the task vectors vary most across models (top
    ``select_topk`` of the non-zero variances), Calculate per-model weights from the mean
    squared task vector, Erase entries whose sign disagrees with the summed majority."""
    b = _f(base)
    if not tensors:
        return b.clone()
    if base.numel() >= fused.MIN_FUSED and fused.usable(base, *tensors):
        out = fused.sce(base, tensors, select_topk)
        if out is not None:
            return out
    tvs = torch.stack([_f(x) - b for x in tensors])
    if select_topk < 1:
        var = tvs.var(dim=0, unbiased=False)
        k = int(torch.count_nonzero(var) * select_topk)
        keep = torch.zeros_like(var, dtype=torch.bool) if k == 0 else \
            _rank_at_least(var.abs().float().view(torch.int32), var.numel() - k)
        tvs.mul_(keep.to(tvs.dtype))
        del var, keep
    majority = torch.where(tvs.sum(dim=0) >= 0, 1.0, -1.0).to(tvs.dtype)
    agree = (tvs.sign() == majority).to(tvs.dtype)
    energy = tvs.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    w = torch.ones_like(energy) / len(tensors) if abs(total) < 1e-6 else energy / total
    agree.mul_(w.view(-1, *([1] * (tvs.dim() - 1))))  # each model's weight where it agrees
    merged = (tvs * agree).sum(dim=0)
    return merged.div_(agree.sum(dim=0).clamp(min=1e-6)).add_(b)


def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    """NearSwap: take ``other`` where it is within ``t`` of the base, and move toward it by
    t / |other - base| elsewhere (entry by entry)."""
    if base.numel() >= fused.MIN_FUSED and fused.usable(base, other):
        return fused.nearswap(base, other, t)
    a, b = _f(base), _f(other)
    w = (t / (a - b).abs_().clamp_(min=1e-6)).clamp_(0, 1)
    return w * b + (1 - w) * a


def arcee_fusion(base: Tensor, other: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion: keep the changes of ``other`` whose importance |delta| * KL(softmax rows)
    reaches median + 1.5 IQR of all importances (quantiles from at most 10^6 entries drawn
    with replacement), the base elsewhere."""
    a, b = _f(base), _f(other)
    fast = base.numel() >= fused.MIN_FUSED and fused.usable(base, other)
    if fast:  # the importances of the sampled entries only; the output pass recomputes them
        kl = fused.row_kl(a, b).reshape(*a.shape[:-1], 1)
        n = a.numel()
        idx = torch.randint(n, (_FUSION_SAMPLE,), generator=generator, device=a.device) \
            if n > _FUSION_SAMPLE else torch.arange(n)
        flat = fused.sampled_importance(a, b, kl, idx)
    else:
        delta = b - a
        p = torch.softmax(b, dim=-1) + 1e-8
        q = torch.softmax(a, dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
        del p, q
        importance = delta.abs() * kl
        flat = importance.reshape(-1)
        if flat.numel() > _FUSION_SAMPLE:
            flat = flat[torch.randint(flat.numel(), (_FUSION_SAMPLE,), generator=generator, device=flat.device)]
    # The sorted values at floor(q * (n - 1)), by selection (linear time) instead of a full sort.
    at = (torch.tensor([0.25, 0.5, 0.75]) * (flat.numel() - 1)).long().tolist()
    if flat.device.type == "cpu":  # numpy selects the three at once, 5x faster than three kthvalue
        picked = np.partition(flat.numpy(), at)
        q1, median, q3 = (torch.tensor(picked[i]) for i in at)
    else:
        q1, median, q3 = (flat.kthvalue(i + 1).values for i in at)
    threshold = median + 1.5 * (q3 - q1)
    if fast:
        return fused.fusion(a, b, kl, threshold)
    keep = importance >= threshold
    return a + delta * keep.to(delta.dtype)


_FUSION_SAMPLE = 1_000_000


def ram(base: Tensor, tensors: list[Tensor], *, epsilon: float = 1e-5, r: float | None = None,
        alpha: float = 0.2) -> Tensor:
    """RAM (Reinforced Agent Merging): entries changed (|delta| > epsilon) by one model only
    keep that model's change, entries changed by several take their mean.

    RAM+ tensor-local (``r`` given): a model's unique changes are scaled by
    1 + r * clamp(shared / unique, 0, alpha), shared and unique counting its changed entries.
    """
    b = _f(base)
    if not tensors:
        return b.clone()
    if base.numel() >= fused.MIN_FUSED and fused.usable(base, *tensors):
        return fused.ram(base, tensors, epsilon, r, alpha)
    tvs = torch.stack([_f(x) - b for x in tensors]).reshape(len(tensors), -1)
    changed = tvs.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    shared, unique = counts > 1, counts == 1
    tvs.mul_(changed)
    unique_part = tvs * unique
    if r is not None:
        n_shared = (changed & shared).sum(dim=1)
        n_unique = (changed & unique).sum(dim=1)
        rho = n_shared / n_unique.clamp(min=epsilon)
        unique_part.mul_((1 + r * rho.clamp(min=0, max=alpha)).unsqueeze(-1))
    merged = (unique_part + tvs * shared / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return b + merged.reshape(b.shape)


def __getattr__(name: str):
    # The method table moved to evomerge.merge.registry; old imports keep working.
    if name in ("METHODS", "Param"):
        from evomerge.merge import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'evomerge.merge.methods' has no attribute {name!r}")
