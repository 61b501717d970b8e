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
from collections import namedtuple
from dataclasses import dataclass

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
SCAN_SCRATCH = 1 << 11  # elements per cache-resident scratch of the threshold scan
BLOCK = 1 << 13  # elements per block of the fused merge (k + 3 buffers stay in L2)
SAMPLE = 8192  # magnitudes sampled to bracket the threshold
BRACKET = (5.0, 4)  # bracket half-width: standard deviations of the sample rank, plus slack
MIN_FUSED = 1 << 15  # smaller tensors: the torch code is as fast
ALL, TOP, BAND, DRAW, MASK = range(5)  # Keep.mode: which entries of a delta are kept
HASH_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # of methods.uniform_draws' integer hash
DELLA_BUCKETS = 2  # DELLA's rank buckets per entry of a row
DELLA_WINDOW = 7  # buckets of at most this many + 1 entries are ranked by comparisons, larger ones sorted


def usable(*tensors: Tensor) -> bool:
    return ENABLED and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().reshape(-1).numpy()


_NO_BASE = np.zeros(1, dtype=np.float32)  # stands in for an absent base (numba needs an array)
_NO_KEEP = np.zeros(1, dtype=np.bool_)  # stands in for a keep mask computed from draws


if numba is not None:

    @intrinsic
    def _fma32(typingctx, a, b, c):
        """float32 a * b + c with one rounding (torch's add(..., alpha=) on CPU is an FMA)."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            return builder.fma(*args)

        return sig, codegen

    @intrinsic
    def _f64_from_bits(typingctx, i):
        sig = types.float64(types.int64)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.float64))

        return sig, codegen

    @intrinsic
    def _bits_of_f64(typingctx, x):
        sig = types.int64(types.float64)

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.int64))

        return sig, codegen

    # exp and log in straight-line code that vectorises (numba's pip build has no vector math
    # library, so math.exp / math.log are scalar libm calls); within a few ulps of libm.
    _LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # Cody-Waite split
    _EXP_TAYLOR = tuple(1.0 / math.factorial(i) for i in range(13, -1, -1))  # 1/13! ... 1/0!
    _ATANH_SERIES = tuple(1.0 / (2 * i + 1) for i in range(11, -1, -1))  # log m = 2 atanh(s)

    @njit(cache=True, nogil=True, inline="always")
    def _exp_nonpositive(x):
        """exp(x) for x <= 0; 0 below -708 (where exp is subnormal)."""
        xc = max(x, -708.0)
        k = np.floor(xc * 1.4426950408889634 + 0.5)
        r = (xc - k * _LN2_HI) - k * _LN2_LO  # |r| <= ln(2) / 2
        poly = _EXP_TAYLOR[0]
        for c in _EXP_TAYLOR[1:]:
            poly = poly * r + c
        scaled = poly * _f64_from_bits((np.int64(k) + 1023) << 52)
        return scaled if x >= -708.0 else 0.0

    @njit(cache=True, nogil=True, inline="always")
    def _log_positive(y):
        """log(y) for a positive, normal y."""
        bits = _bits_of_f64(y)
        e = np.float64((bits >> 52) - 1023)
        m = _f64_from_bits((bits & 0x000FFFFFFFFFFFFF) | 0x3FF0000000000000)  # y = m 2^e, m in [1, 2)
        big = m > 1.4142135623730951
        m = m * 0.5 if big else m
        e = e + 1.0 if big else e
        t = (m - 1.0) / (m + 1.0)  # |t| <= 0.172
        t2 = t * t
        poly = _ATANH_SERIES[0]
        for c in _ATANH_SERIES[1:]:
            poly = poly * t2 + c
        return e * _LN2_HI + (2.0 * t * poly + e * _LN2_LO)

    @njit(cache=True, nogil=True, inline="always")
    def _sum4(v, n):
        """v[:n] summed in four interleaved running sums (no one chain of dependent additions)."""
        acc = np.zeros(4)
        quad = n - n % 4
        for j in range(0, quad, 4):
            for i in range(4):
                acc[i] += v[j + i]
        for j in range(quad, n):
            acc[0] += v[j]
        return (acc[0] + acc[1]) + (acc[2] + acc[3])

    @njit(parallel=True, cache=True, nogil=True)
    def _bracket_scan(x, b, has_base, lo, hi, buf, pos, counts):
        """Per chunk: #(|x-b| < lo), #(> hi), #NaN, and the in-bracket magnitudes and their positions
        into buf/pos[chunk start:] (|x| without a base). Branch-free (which side an element falls
        on is unpredictable): every magnitude is stored to a small cache-resident scratch, whose
        in-bracket prefix is then copied out."""
        n = x.size
        nch = counts.shape[0]
        for c in prange(nch):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            below = 0
            above = 0
            nan = 0
            m = s
            vals = np.empty(SCAN_SCRATCH + 1, dtype=np.float32)
            where = np.empty(SCAN_SCRATCH + 1, dtype=np.int32)
            for s2 in range(s, e, SCAN_SCRATCH):
                k = 0
                for j in range(s2, min(e, s2 + SCAN_SCRATCH)):
                    a = abs(x[j] - b[j]) if has_base else abs(x[j])
                    below += a < lo
                    above += a > hi
                    nan += a != a
                    vals[k] = a
                    where[k] = j - s2
                    k += (a >= lo) & (a <= hi)
                for i in range(k):
                    buf[m + i] = vals[i]
                    pos[m + i] = s2 + where[i]
                m += k
            counts[c, 0] = below
            counts[c, 1] = above
            counts[c, 2] = m - s
            counts[c, 3] = nan

    @njit(cache=True, nogil=True, inline="always")
    def _above(a, t, first, j):
        """|delta| ranks above a threshold: above ``t``, or equal to it at or after ``first``
        (ties are broken by position, as the exact selection in ``methods`` breaks them)."""
        return (a > t) | ((a == t) & (j >= first))

    @njit(parallel=True, cache=True, nogil=True)
    def _gta_kernel(b, xs, mode, lo_t, lo_cut, hi_t, hi_cut, k1, k2, dens, masks, scale, w, consensus, normalize,
                    divisor, lam, out):
        """out = b + lam * combine(w_i * s_i * keep_i(x_i - b)), in the float32 op order of
        methods.generalized_task_arithmetic; model i's kept entries by ``mode[i]`` (see Keep).
        Per block of BLOCK elements the kept, weighted deltas sit in a small cache-resident
        buffer, and every inner loop is branch-free (so it vectorises)."""
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
                if mode[i] == TOP:
                    t, first = lo_t[i], lo_cut[i] - s
                    for j in range(m):
                        d = x[j] - bb[j]
                        di[j] = d if _above(abs(d), t, first, j) else zero
                elif mode[i] == BAND:
                    t, first, u, ufirst = lo_t[i], lo_cut[i] - s, hi_t[i], hi_cut[i] - s
                    for j in range(m):
                        d = x[j] - bb[j]
                        a = abs(d)
                        di[j] = d if _above(a, t, first, j) & (not _above(a, u, ufirst, j)) else zero
                elif mode[i] == DRAW:
                    key1, key2, p = k1[i], k2[i], dens[i]
                    for j in range(m):
                        d = x[j] - bb[j]
                        di[j] = d if _draw(s + j, key1, key2) < p else zero
                elif mode[i] == MASK:
                    keep = masks[i][s:s + m]
                    for j in range(m):
                        d = x[j] - bb[j]
                        di[j] = d if keep[j] else zero
                else:
                    for j in range(m):
                        di[j] = x[j] - bb[j]
                if scale[i] != one:
                    si = scale[i]
                    for j in range(m):
                        di[j] = di[j] * si
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


    # -- kernels of the methods added with mergekit 0.1.5, and of the random-drop family ------

    @njit(parallel=True, cache=True, nogil=True)
    def _gram_kernel(xs, b, has_base, partial):
        """Per chunk, the float64 dot products of the inputs (their deltas from b if has_base)."""
        n = xs[0].size
        k = len(xs)
        for c in prange(partial.shape[0]):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            acc = np.zeros((k, k))
            d = np.empty(k)
            for j in range(s, e):
                for i in range(k):
                    v = np.float64(xs[i][j])
                    if has_base:
                        v = np.float64(xs[i][j] - b[j])
                    d[i] = v
                for i in range(k):
                    for m in range(i, k):
                        acc[i, m] += d[i] * d[m]
            partial[c] = acc

    @njit(parallel=True, cache=True, nogil=True)
    def _affine_kernel(xs, b, has_base, coefs, out):
        """out = b + sum_i c_i (x_i - b) with a base, else sum_i c_i x_i (float64 coefficients)."""
        n = out.size
        k = len(xs)
        nch = (n + CHUNK - 1) // CHUNK
        for c in prange(nch):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            for j in range(s, e):
                acc = 0.0
                if has_base:
                    for i in range(k):
                        acc += coefs[i] * np.float64(xs[i][j] - b[j])
                    out[j] = np.float32(np.float64(b[j]) + acc)
                else:
                    for i in range(k):
                        acc += coefs[i] * np.float64(xs[i][j])
                    out[j] = np.float32(acc)

    @njit(parallel=True, cache=True, nogil=True)
    def _nearswap_kernel(a, b, t, out):
        """methods.nearswap, op for op in float32."""
        n = out.size
        one = np.float32(1.0)
        floor = np.float32(1e-6)
        nch = (n + CHUNK - 1) // CHUNK
        for c in prange(nch):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            for j in range(s, e):
                diff = abs(a[j] - b[j])
                w = t / max(diff, floor)
                w = min(max(w, np.float32(0.0)), one)
                out[j] = w * b[j] + (one - w) * a[j]

    @njit(parallel=True, cache=True, nogil=True)
    def _ram_counts_kernel(b, xs, eps, partial):
        """Per chunk and model: how many of its changed entries are shared, how many unique."""
        n = b.size
        k = len(xs)
        for c in prange(partial.shape[0]):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            for j in range(s, e):
                count = 0
                for i in range(k):
                    count += abs(xs[i][j] - b[j]) > eps
                for i in range(k):
                    if abs(xs[i][j] - b[j]) > eps:
                        if count > 1:
                            partial[c, i, 0] += 1
                        else:
                            partial[c, i, 1] += 1

    @njit(parallel=True, cache=True, nogil=True)
    def _ram_kernel(b, xs, eps, factor, out):
        """methods.ram: unique changes (times the model's RAM+ factor) kept, shared ones averaged."""
        n = b.size
        k = len(xs)
        nch = (n + CHUNK - 1) // CHUNK
        zero = np.float32(0.0)
        for c in prange(nch):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            for j in range(s, e):
                count = 0
                for i in range(k):
                    count += abs(xs[i][j] - b[j]) > eps
                merged = zero
                for i in range(k):
                    d = xs[i][j] - b[j]
                    if not abs(d) > eps:
                        d = d * zero
                    if count == 1:
                        merged += d * factor[i]
                    elif count > 1:
                        merged += d / np.float32(count)
                    else:
                        merged += d * zero
                out[j] = b[j] + merged

    @njit(cache=True, nogil=True, inline="always")
    def _lowbias32(x):
        x ^= x >> np.uint32(16)
        x = np.uint32(x * np.uint32(HASH_MULTIPLIERS[0]))
        x ^= x >> np.uint32(15)
        x = np.uint32(x * np.uint32(HASH_MULTIPLIERS[1]))
        x ^= x >> np.uint32(16)
        return x

    @njit(cache=True, nogil=True, inline="always")
    def _draw(j, k1, k2):
        """methods.uniform_draws of entry j: computed where it is used, never stored."""
        h = _lowbias32(np.uint32(_lowbias32(np.uint32(j) ^ k1) ^ k2))
        return np.float32(np.int32(h >> np.uint32(8))) * np.float32(5.9604644775390625e-08)  # 2^-24

    @njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
    def _draw_l1_kernel(x, b, k1, k2, density, partial):
        """DARE's first pass over one model: per chunk, sum |x - b| and the same over the entries
        its draws keep (float64; a non-finite delta makes the sums non-finite). The sums may be
        reassociated (so the loop vectorises): they only set the L1 rescale factor."""
        n = x.size
        for c in prange(partial.shape[0]):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            total = 0.0
            kept = 0.0
            for j in range(s, e):
                a = np.float64(abs(x[j] - b[j]))
                total += a
                kept += a if _draw(j, k1, k2) < density else 0.0
            partial[c, 0] = total
            partial[c, 1] = kept

    # One thread's scratch arrays for DELLA's rows (a namedtuple: numba caches code that takes one).
    DellaScratch = namedtuple("DellaScratch", "mags counts order bucket rank placed near_mag near_bucket sums")

    @njit(cache=True, nogil=True)
    def _della_scratch(cols):
        return DellaScratch(np.empty(cols, dtype=np.float32), np.zeros(DELLA_BUCKETS * cols + 1, dtype=np.int32),
                            np.empty(cols, dtype=np.int32), np.empty(cols, dtype=np.int32),
                            np.empty(cols, dtype=np.int32), np.empty(cols, dtype=np.int32),
                            np.empty(cols + 2 * DELLA_WINDOW, dtype=np.float32),
                            np.empty(cols + 2 * DELLA_WINDOW, dtype=np.int32), np.zeros(3))

    @njit(cache=True, nogil=True)
    def _della_row(x, b, s, cols, k1, k2, low, span, keep, w):
        """One row of _della_keep_kernel (a function of its own: numba's parallel-loop analysis
        mishandles this loop nest inline). Adds the row's L1 sums to ``w.sums``; a row with a
        non-finite magnitude is counted in sums[2] and left undecided."""
        mags, counts, order, bucket, rank = w.mags, w.counts, w.order, w.bucket, w.rank
        near_mag, near_bucket = w.near_mag, w.near_bucket
        denom = np.float32(cols - 1)
        top = np.float32(0.0)
        bad = 0
        total = 0.0
        for j in range(cols):
            m = abs(x[s + j] - b[s + j])
            mags[j] = m
            top = max(top, m)
            bad += not (m <= np.float32(3.4028234663852886e38))  # NaN or inf
            total += np.float64(m)
        if bad:
            w.sums[2] += bad
            return
        buckets = DELLA_BUCKETS * cols
        counts[:] = 0
        scale = np.float32(buckets / np.float64(top) if top > 0 else 0.0)
        last = buckets - 1
        for j in range(cols):
            q = min(np.int32(mags[j] * scale), last)
            bucket[j] = q
            counts[q + 1] += 1
        biggest = 0
        for q in range(buckets):
            biggest = max(biggest, counts[q + 1])
            counts[q + 1] += counts[q]
        for j in range(cols):  # j ascending: a bucket holds its entries in position order
            q = bucket[j]
            order[counts[q]] = j
            counts[q] += 1
        if biggest <= DELLA_WINDOW + 1:
            # Every bucket fits in the window: an entry's rank is its place in bucket order, less
            # the earlier entries of its bucket with a larger magnitude, plus the later ones with
            # a smaller (fixed-length loops over contiguous copies, which vectorise).
            pad = DELLA_WINDOW
            for p in range(pad):
                near_bucket[p] = -1
                near_bucket[cols + pad + p] = -1
            for p in range(cols):
                j = order[p]
                near_mag[p + pad] = mags[j]
                near_bucket[p + pad] = bucket[j]
            placed = w.placed
            for p in range(cols):
                c = p + pad
                m = near_mag[c]
                q = near_bucket[c]
                r = np.int32(p)
                for d in range(1, pad + 1):
                    r += (np.int32((near_bucket[c + d] == q) & (near_mag[c + d] < m))
                          - np.int32((near_bucket[c - d] == q) & (near_mag[c - d] > m)))
                placed[p] = r
            for p in range(cols):
                rank[order[p]] = placed[p]
        else:  # a crowded bucket (heavy ties, a far outlier): sort each bucket
            start = 0
            for q in range(buckets):
                end = counts[q]  # after the scatter, counts[q] is where bucket q ends
                if end - start > 64:
                    sub = order[start:end].copy()
                    idx = np.argsort(mags[sub], kind="mergesort")
                    order[start:end] = sub[idx]
                elif end - start > 1:
                    for p in range(start + 1, end):  # stable insertion sort by magnitude
                        j = order[p]
                        m = mags[j]
                        v = p - 1
                        while v >= start and mags[order[v]] > m:
                            order[v + 1] = order[v]
                            v -= 1
                        order[v + 1] = j
                start = end
            for p in range(cols):
                rank[order[p]] = p
        for j in range(cols):
            # the keep probability in methods.della_mask's float32 op order
            keep[s + j] = _draw(s + j, k1, k2) < (np.float32(rank[j]) / denom) * span + low
        zero = np.float64(0.0)
        kept = np.zeros(4)  # four running sums: no one chain of dependent additions
        quad = cols - cols % 4
        for j in range(0, quad, 4):
            for i in range(4):
                kept[i] += np.float64(mags[j + i]) if keep[s + j + i] else zero
        for j in range(quad, cols):
            kept[0] += np.float64(mags[j]) if keep[s + j] else zero
        w.sums[0] += total
        w.sums[1] += (kept[0] + kept[1]) + (kept[2] + kept[3])

    @njit(parallel=True, cache=True, nogil=True)
    def _della_keep_kernel(x, b, rows, cols, k1, k2, low, span, keep, partial):
        """DELLA MagPrune per row: keep where draw < low + span * rank / (cols - 1), rank = the entry's
        position when the row's |x - b| are sorted ascending (ties in position order); per block of
        rows, the L1 sums (total, kept) and the count of non-finite magnitudes.

        The ranks come from a bucket sort: magnitudes spread over DELLA_BUCKETS * cols equal-width
        buckets (a few entries each), ranked within their bucket by comparisons -- linear time
        instead of a sort."""
        nblk = (rows + 63) // 64
        for blk in prange(nblk):
            w = _della_scratch(cols)
            for r in range(blk * 64, min(rows, (blk + 1) * 64)):
                _della_row(x, b, r * cols, cols, k1, k2, low, span, keep, w)
            partial[blk, 0] = w.sums[0]
            partial[blk, 1] = w.sums[1]
            partial[blk, 2] = w.sums[2]

    @njit(parallel=True, cache=True, nogil=True)
    def _variance_kernel(b, xs, out):
        """Per entry the variance of the task vectors across models (population), in float64
        rounded once to float32 -- what torch.var(dim=0, unbiased=False) gives, bit for bit."""
        n = b.size
        k = len(xs)
        nch = (n + CHUNK - 1) // CHUNK
        for c in prange(nch):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            for j in range(s, e):
                mean = 0.0
                for i in range(k):
                    mean += np.float64(xs[i][j] - b[j])
                mean /= k
                acc = 0.0
                for i in range(k):
                    dv = np.float64(xs[i][j] - b[j]) - mean
                    acc += dv * dv
                out[j] = np.float32(acc / k)

    @njit(parallel=True, cache=True, nogil=True, fastmath={"reassoc"})
    def _sce_energy_kernel(b, xs, var, selecting, t, cut, partial):
        """Per chunk and model: sum of the selected task vector entries squared (float64; may be
        reassociated so the loop vectorises: the sums only set the models' weights)."""
        n = b.size
        k = len(xs)
        for c in prange(partial.shape[0]):
            s = c * CHUNK
            e = min(n, s + CHUNK)
            for i in range(k):
                x = xs[i]
                acc = 0.0
                for j in range(s, e):
                    d = x[j] - b[j]
                    sel = (not selecting) | _above(var[j], t, cut, j)
                    acc += np.float64(d * d) if sel else 0.0
                partial[c, i] = acc

    @njit(parallel=True, cache=True, nogil=True)
    def _sce_kernel(b, xs, var, selecting, t, cut, w, out):
        """methods.sce's merge: the selected entries, each model weighted by w where its sign agrees
        with the majority of the summed task vectors (blocked like _gta_kernel, so it vectorises)."""
        n = b.size
        k = len(xs)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        tiny = np.float32(1e-6)
        nblocks = (n + BLOCK - 1) // BLOCK
        for c in prange(nblocks):
            s = c * BLOCK
            m = min(n, s + BLOCK) - s
            bb = b[s:s + m]
            deltas = np.empty((k, m), dtype=np.float32)
            f = np.ones(m, dtype=np.float32)
            if selecting:
                v = var[s:s + m]
                first = cut - s
                for j in range(m):
                    f[j] = one if _above(v[j], t, first, j) else zero
            sign = np.zeros(m, dtype=np.float32)  # the summed task vectors, then their sign
            for i in range(k):
                x = xs[i][s:s + m]
                di = deltas[i]
                for j in range(m):
                    di[j] = (x[j] - bb[j]) * f[j]
                    sign[j] = sign[j] + di[j]
            for j in range(m):
                sign[j] = one if sign[j] >= zero else -one
            merged = np.zeros(m, dtype=np.float32)
            weight = np.zeros(m, dtype=np.float32)
            for i in range(k):
                di = deltas[i]
                wi = w[i]
                for j in range(m):
                    d = di[j]
                    sd = one if d > zero else (-one if d < zero else zero)
                    a = wi if sd == sign[j] else zero
                    merged[j] = merged[j] + d * a
                    weight[j] = weight[j] + a
            o = out[s:s + m]
            for j in range(m):
                o[j] = merged[j] / max(weight[j], tiny) + bb[j]

    @njit(parallel=True, cache=True, nogil=True)
    def _row_kl_kernel(a, b, rows, cols, kl):
        """Per row: KL(softmax(b) + 1e-8 || softmax(a) + 1e-8), methods.arcee_fusion's importance scale
        (float64; each exponential computed once and kept for the row)."""
        for blk in prange((rows + 63) // 64):
            ea = np.empty(cols)
            eb = np.empty(cols)
            terms = np.empty(cols)
            for r in range(blk * 64, min(rows, (blk + 1) * 64)):
                s = r * cols
                ma = -np.inf
                mb = -np.inf
                for j in range(cols):
                    ma = max(ma, np.float64(a[s + j]))
                    mb = max(mb, np.float64(b[s + j]))
                for j in range(cols):
                    ea[j] = _exp_nonpositive(a[s + j] - ma)
                    eb[j] = _exp_nonpositive(b[s + j] - mb)
                za = _sum4(ea, cols)
                zb = _sum4(eb, cols)
                for j in range(cols):
                    p = eb[j] / zb + 1e-8
                    q = ea[j] / za + 1e-8
                    terms[j] = p * _log_positive(p / q)
                kl[r] = _sum4(terms, cols)

    @njit(cache=True, nogil=True, inline="always")
    def _row_of(j, cols, inv_cols):
        """j // cols without a 64-bit integer division (tens of cycles each)."""
        r = np.int64(np.float64(j) * inv_cols)
        r -= r * cols > j
        r += (r + 1) * cols <= j
        return r

    @njit(cache=True, nogil=True)
    def _by_region(idx, shift, regions):
        """idx ordered by region (idx >> shift), a counting sort: the gathers then stay in cache."""
        counts = np.zeros(regions + 1, dtype=np.int64)
        for i in range(idx.size):
            counts[(idx[i] >> shift) + 1] += 1
        for q in range(regions):
            counts[q + 1] += counts[q]
        ordered = np.empty_like(idx)
        for i in range(idx.size):
            q = idx[i] >> shift
            ordered[counts[q]] = idx[i]
            counts[q] += 1
        return ordered

    @njit(parallel=True, cache=True, nogil=True)
    def _sampled_importance_kernel(a, b, kl, cols, idx, out):
        """methods.arcee_fusion's importances |b - a| * kl(row) at the sampled flat positions idx,
        in region order (the quantiles taken of them do not depend on the order)."""
        shift = 14
        ordered = _by_region(idx, shift, (a.size >> shift) + 1)
        inv_cols = 1.0 / cols
        for i in prange(ordered.size):
            j = ordered[i]
            out[i] = abs(b[j] - a[j]) * kl[_row_of(j, cols, inv_cols)]

    @njit(parallel=True, cache=True, nogil=True)
    def _fusion_kernel(a, b, kl, cols, threshold, out):
        """methods.arcee_fusion's output: a + delta where |delta| * kl(row) >= threshold, else a."""
        rows = out.size // cols
        per_block = max(1, CHUNK // cols)
        zero = np.float32(0.0)
        one = np.float32(1.0)
        for blk in prange((rows + per_block - 1) // per_block):
            for r in range(blk * per_block, min(rows, (blk + 1) * per_block)):
                k = kl[r]
                for j in range(r * cols, (r + 1) * cols):
                    d = b[j] - a[j]
                    out[j] = a[j] + d * (one if abs(d) * k >= threshold else zero)


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


def magnitude_threshold(x: Tensor, base: Tensor | None, drop: int) -> tuple[float, int] | None:
    """(t, cut): |x - base| > t, or == t at flat position >= cut, are the kept entries once the
    ``drop`` smallest magnitudes are dropped (ties at the cut broken by position, lower
    positions dropped first, as ``methods.magnitude_mask``). None when a delta is NaN.
    Without a base: the magnitudes of ``x`` itself."""
    n = x.numel()
    xf, bf = _np(x), (_NO_BASE if base is None else _np(base))
    # Deterministic sample positions: the result never depends on them, only the speed does.
    idx = np.random.default_rng(n).integers(0, n, size=min(SAMPLE, n))
    sample = np.sort(np.abs(xf[idx] - bf[idx]) if base is not None else np.abs(xf[idx]))
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
    _bracket_scan(xf, bf, base is not None, lo, hi, buf, pos, counts)
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
    mags = x.reshape(-1).abs() if base is None else (x.reshape(-1) - base.reshape(-1)).abs_()
    eq = (mags == t).nonzero().squeeze(1)
    return int(eq[drop_equal])


def _exact_threshold(x: Tensor, base: Tensor, drop: int) -> tuple[float, int]:
    from evomerge.merge.methods import _kth_smallest_bits

    bits = (x.abs() if base is None else (x - base).abs_()).view(torch.int32)
    value, below, equal = _kth_smallest_bits(bits, drop - 1)
    t = float(torch.tensor(value, dtype=torch.int32).view(torch.float32))
    return t, _cut(x, base, t, drop - below, equal)


@dataclass
class Keep:
    """Which entries of one model's delta ``x - base`` a generalized task arithmetic keeps:
    ALL; TOP: |delta| above ``lower`` (a threshold and the position from which entries equal
    to it count as above, as ``magnitude_threshold`` returns it); BAND: above ``lower`` and not
    above ``upper``; DRAW: the entries whose draws (``keys``) fall below ``density``; MASK: ``mask``.
    The kept deltas are multiplied by ``scale`` (DARE's L1 rescale)."""

    mode: int = 0
    lower: tuple[float, int] = (0.0, 0)
    upper: tuple[float, int] = (0.0, 0)
    keys: tuple[int, int] = (0, 0)
    density: float = 1.0
    mask: Tensor | None = None
    scale: float = 1.0


def gta(base: Tensor, tensors: list[Tensor], weights: list[float], keeps: list[Keep], consensus: bool,
        normalize: bool, lam: float) -> Tensor:
    """base + lam * combine(w_i * s_i * keep_i(x_i - base)) in one pass; see ``methods``."""
    assert len(tensors) == len(weights) == len(keeps)
    divisor = sum(weights)
    if abs(divisor) < 1e-8:
        divisor = 1.0
    out = torch.empty_like(base)

    def column(get, dtype):
        return np.array([get(k) for k in keeps], dtype=dtype)

    _gta_kernel(_np(base), _tuple(tensors), column(lambda k: k.mode, np.int64),
                column(lambda k: k.lower[0], np.float32), column(lambda k: k.lower[1], np.int64),
                column(lambda k: k.upper[0], np.float32), column(lambda k: k.upper[1], np.int64),
                column(lambda k: k.keys[0], np.uint32), column(lambda k: k.keys[1], np.uint32),
                column(lambda k: k.density, np.float32),
                tuple(_NO_KEEP if k.mask is None else _np(k.mask) for k in keeps),
                column(lambda k: k.scale, np.float32), np.array(weights, dtype=np.float32), consensus, normalize,
                np.float32(divisor), np.float32(lam), _np(out))
    return out


def linear(tensors: list[Tensor], weights: list[float], normalize: bool, total: float) -> Tensor:
    out = torch.empty_like(tensors[0])
    _linear_kernel(tuple(_np(x) for x in tensors), np.array(weights, dtype=np.float32), normalize,
                   np.float32(total), _np(out))
    return out


# -- wrappers for the kernels above ---------------------------------------------------------------

def _chunks(n: int) -> int:
    return (n + CHUNK - 1) // CHUNK


def _tuple(tensors: list[Tensor]) -> tuple:
    return tuple(_np(x) for x in tensors)




def gram(tensors: list[Tensor], base: Tensor | None) -> np.ndarray:
    """The float64 Gram matrix of the inputs (of their deltas from ``base`` when given), one pass."""
    k = len(tensors)
    partial = np.zeros((_chunks(tensors[0].numel()), k, k))
    _gram_kernel(_tuple(tensors), _NO_BASE if base is None else _np(base), base is not None, partial)
    g = partial.sum(0)
    return np.triu(g) + np.triu(g, 1).T


def affine(tensors: list[Tensor], base: Tensor | None, coefs: np.ndarray) -> Tensor:
    """``base + sum_i c_i (x_i - base)`` (or ``sum_i c_i x_i`` without a base), one pass."""
    out = torch.empty_like(tensors[0])
    _affine_kernel(_tuple(tensors), _NO_BASE if base is None else _np(base), base is not None,
                   np.asarray(coefs, dtype=np.float64), _np(out))
    return out


def nearswap(base: Tensor, other: Tensor, t: float) -> Tensor:
    out = torch.empty_like(base)
    _nearswap_kernel(_np(base), _np(other), np.float32(t), _np(out))
    return out


def ram(base: Tensor, tensors: list[Tensor], epsilon: float, r: float | None, alpha: float) -> Tensor:
    k = len(tensors)
    xs, b, eps = _tuple(tensors), _np(base), np.float32(epsilon)
    factor = np.ones(k, dtype=np.float32)
    if r is not None:
        partial = np.zeros((_chunks(base.numel()), k, 2), dtype=np.int64)
        _ram_counts_kernel(b, xs, eps, partial)
        shared, unique = partial.sum(0).T
        rho = (shared / np.maximum(unique, epsilon)).astype(np.float32)
        factor = (np.float32(1) + np.float32(r) * np.clip(rho, 0, np.float32(alpha))).astype(np.float32)
    out = torch.empty_like(base)
    _ram_kernel(b, xs, eps, factor, _np(out))
    return out


def draw_l1(x: Tensor, base: Tensor, keys: tuple[int, int], density: float) -> tuple[float, float]:
    """DARE's L1 sums of ``x - base``: (all entries, the entries the draws keep); non-finite if a delta is."""
    partial = np.zeros((_chunks(x.numel()), 2))
    _draw_l1_kernel(_np(x), _np(base), np.uint32(keys[0]), np.uint32(keys[1]), np.float32(density), partial)
    total, kept = partial.sum(0)
    return float(total), float(kept)


def della_keep(x: Tensor, base: Tensor, keys: tuple[int, int], density: float, epsilon: float
               ) -> tuple[Tensor, float, float] | None:
    """methods.della_mask of ``x - base`` with the draws of ``keys``, and its L1 sums (all entries,
    kept entries); None when a delta is not finite or a row has one entry (the torch code's
    rank normalisation, NaN, decides there)."""
    rows = x.shape[0] if x.dim() >= 2 else 1  # as methods.della_mask: rows = the first axis
    cols = x.numel() // max(rows, 1)
    if cols < 2:
        return None
    keep = torch.empty(x.shape, dtype=torch.bool)
    partial = np.zeros(((rows + 63) // 64, 3))
    _della_keep_kernel(_np(x), _np(base), rows, cols, np.uint32(keys[0]), np.uint32(keys[1]),
                       np.float32(density - epsilon), np.float32(2 * epsilon), _np(keep), partial)
    total, kept, bad = partial.sum(0)
    return None if bad else (keep, float(total), float(kept))


def sce(base: Tensor, tensors: list[Tensor], select_topk: float) -> Tensor | None:
    """methods.sce in three passes (variance, energy, merge); None: take the torch path (NaN)."""
    n, k = base.numel(), len(tensors)
    b, xs = _np(base), _tuple(tensors)
    selecting = select_topk < 1
    var, t, cut = _NO_BASE, np.float32(0), 0
    if selecting:
        var_t = torch.empty_like(base)
        var = _np(var_t)
        _variance_kernel(b, xs, var)
        if np.isnan(var).any():
            return None
        top = int(np.count_nonzero(var) * select_topk)
        if top == 0:
            t, cut = np.float32(np.inf), n
        else:
            found = magnitude_threshold(var_t, None, n - top)
            if found is None:
                return None
            t, cut = np.float32(found[0]), found[1]
    partial = np.zeros((_chunks(n), k))
    _sce_energy_kernel(b, xs, var, selecting, t, cut, partial)
    energy = partial.sum(0) / n
    total = float(energy.sum())
    w = np.full(k, 1.0 / k) if abs(total) < 1e-6 else energy / total
    out = torch.empty_like(base)
    _sce_kernel(b, xs, var, selecting, t, cut, w.astype(np.float32), _np(out))
    return out


def row_kl(base: Tensor, other: Tensor) -> Tensor:
    """Per row (last axis) KL(softmax(other) + 1e-8 || softmax(base) + 1e-8), float32."""
    cols = base.shape[-1]
    rows = base.numel() // cols
    kl = np.empty(rows, dtype=np.float64)
    _row_kl_kernel(_np(base), _np(other), rows, cols, kl)
    return torch.from_numpy(kl.astype(np.float32))


def sampled_importance(base: Tensor, other: Tensor, kl: Tensor, idx: Tensor) -> Tensor:
    """|other - base| * kl(row) at the flat positions idx (float32, as the torch code computes it),
    in an order of their own."""
    out = torch.empty(idx.numel(), dtype=torch.float32)
    _sampled_importance_kernel(_np(base), _np(other), _np(kl), base.shape[-1], _np(idx), _np(out))
    return out


def fusion(base: Tensor, other: Tensor, kl: Tensor, threshold: Tensor) -> Tensor:
    out = torch.empty_like(base)
    _fusion_kernel(_np(base), _np(other), _np(kl), base.shape[-1], np.float32(float(threshold)), _np(out))
    return out
