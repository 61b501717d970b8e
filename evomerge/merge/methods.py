"""Merge methods: pure functions over the tensors of one parameter.

Semantics, parameter names and defaults follow mergekit 0.1.5, so a recipe
means the same thing here. The code is written for speed: top-k selection by
a two-pass radix select on float bit patterns (linear time, exact) instead of
a full argsort, sign election in a few vectorised passes, and in-place ops on
freshly allocated deltas only (inputs are never modified -- they may be
resident source weights).

All arithmetic happens in float32 (float64 if the inputs are float64); the
result is cast back to the inputs' dtype by the engine.

The ``METHODS`` table below describes every method's parameters (scope, default,
valid range) for plan validation and per-tensor resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from evomerge.merge import fused

_REQUIRED = object()


# -- method table ------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One method parameter. scope: 'shared' (one value per tensor), 'input' (per model,
    base included) or 'non_base' (per model, base excluded)."""

    name: str
    kind: type  # float or bool
    scope: str
    default: Any = _REQUIRED
    low: float | None = None
    high: float | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    def coerce(self, value: Any) -> Any:
        if self.kind is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "yes", "on", "1"):
                    return True
                if value.lower() in ("false", "no", "off", "0"):
                    return False
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return bool(value)
        if isinstance(value, bool):
            return float(value)
        return float(value)

    def validate(self, value: Any, where: str) -> None:
        """Raise ValueError naming ``where`` when a leaf value is of the wrong type or out of range."""
        if self.kind is bool:
            if not isinstance(value, (bool, int)) and str(value).lower() not in ("true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"{where}: {value!r} is not a boolean")
            return
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: {value!r} is not a number") from None
        if not math.isfinite(x):
            raise ValueError(f"{where}: {value!r} is not finite")
        if (self.low is not None and x < self.low) or (self.high is not None and x > self.high):
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            raise ValueError(f"{where}: {value!r} is outside [{lo}, {hi}]")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    needs_base: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    # generalized task arithmetic family only:
    sparsify: str | None = None  # magnitude | random | magnitude_outliers | della_magprune
    consensus: str | None = None  # sum (TIES sign election by summed mass)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


def _gta(name: str, sparsify: str | None, consensus: str | None, normalize: bool, rescale: bool) -> MethodSpec:
    params = [
        Param("int8_mask", bool, "shared", False),
        Param("normalize", bool, "shared", normalize),
        Param("rescale", bool, "shared", rescale),
        Param("lambda", float, "shared", 1.0),
        Param("weight", float, "non_base"),
        Param("density", float, "non_base", 1.0, 0.0, 1.0),
    ]
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", float, "non_base", 0.01, 0.0, 1.0))
    if sparsify == "della_magprune":
        params.append(Param("epsilon", float, "non_base", 0.15, 0.0, 1.0))
    return MethodSpec(name, tuple(params), needs_base=True, sparsify=sparsify, consensus=consensus)


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True))),
        _gta("task_arithmetic", None, None, normalize=False, rescale=False),
        _gta("ties", "magnitude", "sum", normalize=True, rescale=False),
        _gta("dare_ties", "random", "sum", normalize=False, rescale=True),
        _gta("dare_linear", "random", None, normalize=False, rescale=True),
        _gta("breadcrumbs", "magnitude_outliers", None, normalize=False, rescale=False),
        _gta("breadcrumbs_ties", "magnitude_outliers", "sum", normalize=False, rescale=False),
        _gta("della", "della_magprune", "sum", normalize=True, rescale=True),
        _gta("della_linear", "della_magprune", None, normalize=False, rescale=True),
        MethodSpec("slerp", (Param("t", float, "shared", low=0.0, high=1.0),), needs_base=True,
                   min_inputs=2, max_inputs=2),
        MethodSpec("model_stock", (Param("filter_wise", bool, "shared", False),), needs_base=True, min_inputs=3),
        MethodSpec("passthrough", (Param("scale", float, "input", None),), max_inputs=1),
    )
}


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


def random_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return torch.rand(delta.shape, generator=generator, device=delta.device) < density


def della_mask(delta: Tensor, density: float, epsilon: float, generator: torch.Generator | None) -> Tensor:
    """DELLA MagPrune: per row, keep probability rises linearly with magnitude rank,
    from ``density - epsilon`` (smallest) to ``density + epsilon`` (largest)."""
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"density {density} +/- epsilon {epsilon} must stay inside (0, 1)")
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    mags = _f(rows).abs()
    order = torch.argsort(mags, dim=1)
    n = rows.shape[1]
    ranks = torch.empty_like(mags)
    ranks.scatter_(1, order, torch.arange(n, dtype=mags.dtype, device=mags.device).expand_as(mags))
    rank_norm = ranks / (n - 1) if n > 1 else torch.full_like(mags, float("nan"))
    probs = rank_norm.mul_(2 * epsilon).add_(density - epsilon)
    keep = torch.rand(probs.shape, generator=generator, device=probs.device) < probs
    return keep.reshape(delta.shape)


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
    generator: torch.Generator | None = None,
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
    if (sparsify in (None, "magnitude") and not (rescale and sparsify) and base.numel() >= fused.MIN_FUSED
            and fused.usable(base, *tensors)):
        out = _fused_gta(base, tensors, weights, densities, sparsify, consensus, normalize, lam)
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
                keep = random_mask(d, density, generator)
            elif sparsify == "magnitude_outliers":
                keep = magnitude_outliers_mask(d, density, (gammas or [0.01] * len(tensors))[i])
            elif sparsify == "della_magprune":
                keep = della_mask(d, density, (epsilons or [0.15] * len(tensors))[i], generator)
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
    thresholds = []
    for x, density in zip(tensors, densities):
        if sparsify is None or density >= 1:
            thresholds.append(None)
            continue
        drop = n - max(1, int(density * n)) if density > 0 else n
        if drop <= 0:
            thresholds.append(None)
        elif drop >= n:
            thresholds.append((math.inf, n))
        else:
            t = fused.magnitude_threshold(x, base, drop)
            if t is None:  # NaN deltas: the torch code defines what happens
                return None
            thresholds.append(t)
    return fused.gta(base, tensors, weights, thresholds, consensus == "sum", normalize, lam)


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
         generator: torch.Generator | None = None) -> Tensor:
    """DARE: random drop with keep probability ``density``, L1 rescale; TIES sign election if ``ties``."""
    return generalized_task_arithmetic(base, tensors, weights, densities, sparsify="random",
                                       consensus="sum" if ties else None, normalize=normalize,
                                       rescale=rescale, lam=lam, generator=generator)


def breadcrumbs(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
                gammas: list[float], *, ties: bool = False, normalize: bool = False, lam: float = 1.0) -> Tensor:
    """Model breadcrumbs: drop the top-gamma outliers and the smallest, keep ``density``."""
    return generalized_task_arithmetic(base, tensors, weights, densities, sparsify="magnitude_outliers",
                                       consensus="sum" if ties else None, normalize=normalize,
                                       lam=lam, gammas=gammas)


def della(base: Tensor, tensors: list[Tensor], weights: list[float], densities: list[float],
          epsilons: list[float], *, ties: bool = True, normalize: bool = True, rescale: bool = True,
          lam: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune), L1 rescale, optional sign election."""
    return generalized_task_arithmetic(base, tensors, weights, densities, sparsify="della_magprune",
                                       consensus="sum" if ties else None, normalize=normalize,
                                       rescale=rescale, lam=lam, epsilons=epsilons, generator=generator)


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
