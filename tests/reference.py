"""An independent, naive NumPy (float64) attention used as ground truth by the tests.

Shapes: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv] -> [B, T, N, Hv]. Masks are built
here from scratch with explicit loops over positions, not with jattn.masks.
"""

from __future__ import annotations

import numpy as np


def allowed_mask(B, N, T, S, *, mask=None, is_causal=False, offset=0, window=None,
                 q_lengths=None, kv_lengths=None, q_segment_ids=None, kv_segment_ids=None):
    """bool [B, N, T, S]: which keys each query may see."""
    ok = np.ones((B, N, T, S), dtype=bool)
    if mask is not None:
        ok &= np.broadcast_to(np.asarray(mask), (B, N, T, S))
    for b in range(B):
        for t in range(T):
            pos = t + offset
            for s in range(S):
                visible = True
                if is_causal and s > pos:
                    visible = False
                if window is not None and not (pos - window[0] <= s <= pos + window[1]):
                    visible = False
                if q_lengths is not None and t >= q_lengths[b]:
                    visible = False
                if kv_lengths is not None and s >= kv_lengths[b]:
                    visible = False
                if q_segment_ids is not None and q_segment_ids[b, t] != kv_segment_ids[b, s]:
                    visible = False
                if not visible:
                    ok[b, :, t, s] = False
    return ok


def naive_attention(q, k, v, *, bias=None, scale=None, logits_soft_cap=None, **mask_kwargs):
    """Returns (out [B, T, N, Hv], weights [B, N, T, S], lse [B, T, N]) in float64."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    scale = 1.0 / np.sqrt(H) if scale is None else scale
    k_rep = np.repeat(k, G, axis=2)  # [B, S, N, H]
    v_rep = np.repeat(v, G, axis=2)  # [B, S, N, Hv]
    logits = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale  # [B, N, T, S]
    if logits_soft_cap is not None:
        logits = logits_soft_cap * np.tanh(logits / logits_soft_cap)
    if bias is not None:
        logits = logits + np.asarray(bias, dtype=np.float64)
    ok = allowed_mask(B, N, T, S, **mask_kwargs) & (logits > -np.inf)
    masked = np.where(ok, logits, -np.inf)
    row_max = masked.max(axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    p = np.where(ok, np.exp(masked - row_max), 0.0)
    total = p.sum(axis=-1, keepdims=True)
    weights = np.where(total > 0, p / np.where(total > 0, total, 1.0), 0.0)  # [B, N, T, S]
    out = np.einsum("bnts,bsnh->btnh", weights, v_rep)  # [B, T, N, Hv]
    with np.errstate(divide="ignore"):
        lse = np.where(total[..., 0] > 0, np.log(np.where(total[..., 0] > 0, total[..., 0], 1)) + row_max[..., 0], -np.inf)
    return out, weights, np.transpose(lse, (0, 2, 1))  # lse [B, T, N]
