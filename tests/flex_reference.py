"""A float64 NumPy flex attention and NumPy versions of the ready-made mods (test ground truth).

Shapes: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]. Mods here are written for NumPy
broadcasting over index grids ``b [B,1,1,1], h [1,N,1,1], q [1,1,T,1], kv [1,1,1,S]``,
independently of ``jattn.flex.mods``.
"""

from __future__ import annotations

import math

import numpy as np


def grids(B, N, T, S):
    return (np.arange(B)[:, None, None, None], np.arange(N)[None, :, None, None],
            np.arange(T)[None, None, :, None], np.arange(S)[None, None, None, :])


def flex_reference(q, k, v, *, score_fn=None, mask_fn=None, scale=None):
    """Returns (out [B, T, N, Hv], lse [B, T, N]) in float64; rows that see nothing give 0, -inf."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = 1.0 / math.sqrt(H) if scale is None else scale
    k_rep, v_rep = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)  # [B, S, N, *]
    s = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale  # [B, N, T, S]
    b, h, qi, ki = grids(B, N, T, S)
    if score_fn is not None:
        s = np.broadcast_to(score_fn(s, b, h, qi, ki), s.shape).astype(np.float64)
    ok = np.ones(s.shape, bool)
    if mask_fn is not None:
        ok &= np.broadcast_to(mask_fn(b, h, qi, ki), s.shape)
    ok &= s != -np.inf
    out = np.zeros((B, N, T, v.shape[-1]))
    lse = np.full((B, N, T), -np.inf)
    for bb in range(B):
        for nn in range(N):
            for t in range(T):
                row = s[bb, nn, t][ok[bb, nn, t]]
                if row.size == 0:
                    continue
                m = row.max()
                p = np.exp(row - m)
                lse[bb, nn, t] = m + np.log(p.sum())
                out[bb, nn, t] = (p / p.sum()) @ v_rep[bb][ok[bb, nn, t], nn]
    return out.transpose(0, 2, 1, 3), lse.transpose(0, 2, 1)


def t5_bucket_np(rel, num_buckets, max_distance, bidirectional=True):
    """T5's relative-position bucket, one Python int at a time."""
    out = np.zeros(np.shape(rel), np.int64)
    for idx, r in np.ndenumerate(np.asarray(rel)):
        n, ret, nb = -int(r), 0, num_buckets
        if bidirectional:
            nb //= 2
            ret = nb if n < 0 else 0
            n = abs(n)
        else:
            n = max(n, 0)
        exact = nb // 2
        if n < exact:
            out[idx] = ret + n
        else:
            large = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (nb - exact))
            out[idx] = ret + min(large, nb - 1)
    return out
