"""Naive float64 attention: a loop over queries, visible keys chosen one by one."""

from __future__ import annotations

import numpy as np


def rope(x, pos, theta):
    """x [heads, d] at position `pos`, rotate-half layout."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos * inv
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(ang) - x2 * np.sin(ang),
                           x2 * np.cos(ang) + x1 * np.sin(ang)], axis=-1)


def attention(x, wq, wk, wv, wo, segment_ids, positions, theta):
    """x [t, e] one row; wq [e, n, d], wk/wv [e, kv, d], wo [n, d, e] -> [t, e]."""
    t = x.shape[0]
    n, kv = wq.shape[1], wk.shape[1]
    q = np.einsum("te,end->tnd", x, wq)
    k = np.einsum("te,ekd->tkd", x, wk)
    v = np.einsum("te,ekd->tkd", x, wv)
    q = np.stack([rope(q[i], positions[i], theta) for i in range(t)])
    k = np.stack([rope(k[i], positions[i], theta) for i in range(t)])
    out = np.zeros((t, n, wq.shape[2]))
    for i in range(t):
        visible = [j for j in range(i + 1) if segment_ids[j] == segment_ids[i]]
        for h in range(n):
            g = h // (n // kv)
            scores = np.array([q[i, h] @ k[j, g] for j in visible]) / np.sqrt(wq.shape[2])
            p = np.exp(scores - scores.max())
            p /= p.sum()
            out[i, h] = sum(pj * v[j, g] for pj, j in zip(p, visible))
    return np.einsum("tnd,nde->te", out, wo)
