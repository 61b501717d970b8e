"""Fused CPU kernels for the hot merge methods (numba), bit-identical to ``methods``.

The torch code in ``methods`` makes ~20 passes over memory per TIES tensor
(deltas, magnitudes, masks, sign election, divisor), each allocating a fresh
tensor. Here the same arithmetic runs element by element in one parallel loop,
in the same float32 operation order (so results are equal bit for bit -- the
tests compare them), reading each source once:

* ``magnitude_threshold`` finds the exact TIES trim threshold of ``|x - base|``
  without a sort: a few thousand sampled magnitudes give a bracket around the
  target rank, one fused pass counts the elements outside it and gathers those
  inside (a few percent), and ``kthvalue`` runs on that small set. A bracket
  that misses the rank falls back to the exact radix select of ``methods``.
* ``gta`` computes ``base + lam * combine(w_i * trim(x_i - base))`` with the
  optional sign election and normalisation in one pass.
* ``linear`` is the weighted sum, with the fused multiply-add torch uses.

Only float32 CPU tensors take this path; everything else (and any tensor with
NaN deltas) uses the torch code. Without numba installed nothing here is used.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency, but the torch path stays correct without it
    import numba
    from numba import njit, prange, types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

ENABLED = numba is not None and os.environ.get("EVOMERGE_NO_FUSED", "") in ("", "0")
CHUNK = 1 << 16  # elements per parallel work item
BLOCK = 1 << 13  # elements per block of the fused merge (k + 3 buffers stay in L2)
SAMPLE = 8192  # magnitudes sampled to bracket the threshold
BRACKET = (5.0, 4)  # bracket half-width: standard deviations of the sample rank, plus slack
MIN_FUSED = 1 << 15  # smaller tensors: the torch code is as fast


def usable(*tensors: Tensor) -> bool:
    return ENABLED and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


if numba is not None:

    @intrinsic
    def _fma32(typingctx, a, b, c):
        """float32 a * b + c with one rounding (torch's add(..., alpha=) on CPU is an FMA)."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return sig, codegen

    @njit(parallel=True, cache=True, nogil=True)
    def _bracket_scan(x, b, lo, hi, buf, pos, counts):
        """Per chunk: #(|x-b| < lo), #(> hi), #NaN, and the in-bracket magnitudes and their positions
        into buf/pos[chunk start:]. Branch-free: which side an element falls on is unpredictable."""
        n = x.size
        nch = counts.shape[0]
        for c in prange(nch):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            below = 0
            above = 0
            nan = 0
            m = s
            for j in range(s, e):
                a = abs(x[j] - b[j])
                below += a < lo
                above += a > hi
                nan += a != a
                buf[m] = a
                pos[m] = j
                m += (a >= lo) & (a <= hi)
            counts[c, 0] = below
            counts[c, 1] = above
            counts[c, 2] = m - s
            counts[c, 3] = nan

    @njit(parallel=True, cache=True, nogil=True)
    def _gta_kernel(b, xs, w, masked, thr, cut, consensus, normalize, divisor, lam, out):
        """out = b + lam * combine(w_i * keep_i(x_i - b)), in the float32 op order of
        methods.generalized_task_arithmetic. Per block of BLOCK elements the trimmed, weighted
        deltas sit in a small cache-resident buffer, and every inner loop is branch-free."""
        n = b.size
        k = len(xs)
        nblocks = (n + BLOCK - 1) // BLOCK
        one = np.float32(1.0)
        zero = np.float32(0.0)
        for c in prange(nblocks):
            s = c * BLOCK
            m = min(n, s + BLOCK) - s
            bb = b[s:s + m]
            deltas = np.empty((k, m), dtype=np.float32)
            total = np.empty(m, dtype=np.float32)
            for i in range(k):
                x = xs[i][s:s + m]
                di = deltas[i]
                wi = w[i]
                if masked[i]:
                    t = thr[i]
                    first = cut[i] - s
                    for j in range(m):
                        d = x[j] - bb[j]
                        a = abs(d)
                        keep = (a > t) | ((a == t) & (j >= first))
                        di[j] = d if keep else zero
                else:
                    for j in range(m):
                        di[j] = x[j] - bb[j]
                if wi != one:
                    for j in range(m):
                        di[j] = di[j] * wi
                if i == 0:
                    total[:] = di
                else:
                    for j in range(m):
                        total[j] = total[j] + di[j]
            if consensus:
                sign = total  # reused: the majority sign of the summed deltas (ties positive)
                for j in range(m):
                    sign[j] = one if total[j] >= zero else -one
                mixed = np.zeros(m, dtype=np.float32)
                div = np.zeros(m, dtype=np.float32)
                for i in range(k):
                    di = deltas[i]
                    wi = w[i]
                    for j in range(m):
                        d = di[j]
                        agree = d * sign[j] > zero
                        mixed[j] = mixed[j] + (d if agree else zero)
                        div[j] = div[j] + (wi if agree else zero)
                if normalize:
                    for j in range(m):
                        dj = div[j]
                        mixed[j] = mixed[j] / (one if dj == zero else dj)
            else:
                mixed = total
                if normalize:
                    for j in range(m):
                        mixed[j] = mixed[j] / divisor
            o = out[s:s + m]
            if lam != one:
                for j in range(m):
                    o[j] = mixed[j] * lam + bb[j]
            else:
                for j in range(m):
                    o[j] = mixed[j] + bb[j]

    @njit(parallel=True, cache=True, nogil=True)
    def _linear_kernel(xs, w, normalize, total, out):
        n = out.size
        k = len(xs)
        nch = (n + CHUNK - 1) // CHUNK
        for c in prange(nch):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            for j in range(s, e):
                acc = xs[0][j] * w[0]
                for i in range(1, k):
                    acc = _fma32(xs[i][j], w[i], acc)
                if normalize:
                    acc = acc / total
                out[j] = acc


def set_threads(n: int | None = None) -> None:
    """Use as many threads as torch does (numba otherwise takes every core)."""
    if numba is not None:
        numba.set_num_threads(max(1, min(n or torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


_workspace: dict[str, np.ndarray] = {}


def _buffer(name: str, n: int, dtype) -> np.ndarray:
    # Reused between tensors: a fresh 100 MB allocation costs page faults on every merge.
    buf = _workspace.get(name)
    if buf is None or buf.size < n:
        buf = _workspace[name] = np.empty(n, dtype=dtype)
    return buf


def magnitude_threshold(x: Tensor, base: Tensor, drop: int) -> tuple[float, int] | None:
    """(t, cut): |x - base| > t, or == t at flat position >= cut, are the kept entries once the
    ``drop`` smallest magnitudes are dropped (ties at the cut broken by position, lower
    positions dropped first, as ``methods.magnitude_mask``). None when a delta is NaN."""
    n = x.numel()
    xf, bf = _np(x), _np(base)
    # Deterministic sample positions: the result never depends on them, only the speed does.
    idx = np.random.default_rng(n).integers(0, n, size=min(SAMPLE, n))
    sample = np.sort(np.abs(xf[idx] - bf[idx]))
    s = sample.size
    q = (drop - 0.5) / n
    margin = BRACKET[0] * math.sqrt(s * q * (1 - q)) + BRACKET[1]
    lo_i, hi_i = math.floor(q * s - margin), math.ceil(q * s + margin)
    lo = np.float32(sample[lo_i]) if lo_i > 0 else np.float32(-1.0)
    hi = np.float32(sample[hi_i]) if hi_i < s - 1 else np.float32(np.inf)
    if np.isnan(lo) or np.isnan(hi):
        return None
    nch = (n + CHUNK - 1) // CHUNK
    counts = np.zeros((nch, 4), dtype=np.int64)
    buf, pos = _buffer("vals", n, np.float32), _buffer("pos", n, np.int64)
    _bracket_scan(xf, bf, lo, hi, buf, pos, counts)
    if counts[:, 3].any():
        return None
    below = int(counts[:, 0].sum())
    inside = int(counts[:, 2].sum())
    rank = drop - 1 - below  # 0-based rank of the threshold among the bracketed values
    if not 0 <= rank < inside:
        return _exact_threshold(x, base, drop)
    pieces = [(c * CHUNK, c * CHUNK + int(m)) for c, m in enumerate(counts[:, 2]) if m]
    vals = np.concatenate([buf[a:b] for a, b in pieces])
    t = np.partition(vals, rank)[rank]
    equal = vals == t
    drop_equal = drop - below - int(np.count_nonzero(vals < t))
    if drop_equal >= int(np.count_nonzero(equal)):
        return float(t), n
    # Equal magnitudes are common (float32 deltas are discrete): keep those from the
    # (drop_equal)-th equal one on, in position order -- the bracket kept the positions.
    positions = np.concatenate([pos[a:b] for a, b in pieces])[equal]
    return float(t), int(positions[drop_equal])


def _cut(x: Tensor, base: Tensor, t: float, drop_equal: int, equal: int) -> int:
    """Position from which entries equal to the threshold are kept (the first ``drop_equal`` go)."""
    if drop_equal >= equal:
        return x.numel()
    eq = ((x.reshape(-1) - base.reshape(-1)).abs_() == t).nonzero().squeeze(1)
    return int(eq[drop_equal])


def _exact_threshold(x: Tensor, base: Tensor, drop: int) -> tuple[float, int]:
    from evomerge.merge.methods import _kth_smallest_bits

    bits = (x - base).abs_().view(torch.int32)
    value, below, equal = _kth_smallest_bits(bits, drop - 1)
    t = float(torch.tensor(value, dtype=torch.int32).view(torch.float32))
    return t, _cut(x, base, t, drop - below, equal)


def gta(base: Tensor, tensors: list[Tensor], weights: list[float], thresholds: list[tuple[float, int] | None],
        consensus: bool, normalize: bool, lam: float) -> Tensor:
    """The fused generalized task arithmetic (magnitude trim or none); see ``methods``."""
    out = torch.empty_like(base)
    k = len(tensors)
    masked = np.array([t is not None for t in thresholds])
    thr = np.array([t[0] if t else 0.0 for t in thresholds], dtype=np.float32)
    cut = np.array([t[1] if t else 0 for t in thresholds], dtype=np.int64)
    divisor = sum(weights)
    if abs(divisor) < 1e-8:
        divisor = 1.0
    _gta_kernel(_np(base), tuple(_np(x) for x in tensors), np.array(weights, dtype=np.float32), masked, thr, cut,
                consensus, normalize, np.float32(divisor), np.float32(lam), _np(out))
    assert k == len(weights)
    return out


def linear(tensors: list[Tensor], weights: list[float], normalize: bool, total: float) -> Tensor:
    out = torch.empty_like(tensors[0])
    _linear_kernel(tuple(_np(x) for x in tensors), np.array(weights, dtype=np.float32), normalize,
                   np.float32(total), _np(out))
    return out
