"""Naive float64 references for the MoE block: Python loops over tokens and their experts.

Independent of jaxmoe's implementation (NumPy only), so a shared bug cannot hide.
"""

from __future__ import annotations

import math

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def route(x, w_router, bias, *, top_k, scoring, norm_topk_prob, scaling, n_group=1,
          topk_group=1):
    """x [t, d] -> (weights [t, k], indices [t, k], probs [t, e]) for each token separately.

    n_group > 1 (DeepSeek-V3): the experts form n_group equal groups, each scored by the sum
    of its two best selection scores; only the topk_group best groups' experts are chosen."""
    t = x.shape[0]
    probs, weights, indices = [], [], []
    for i in range(t):
        logits = x[i] @ w_router
        if scoring == "softmax":
            p = np.exp(logits - logits.max())
            p = p / p.sum()
        else:
            p = 1.0 / (1.0 + np.exp(-logits))
        sel = p + bias
        allowed = range(len(p))
        if n_group > 1:
            size = len(p) // n_group
            score = [sum(sorted(sel[g * size:(g + 1) * size])[-2:]) for g in range(n_group)]
            best = sorted(range(n_group), key=lambda g: -score[g])[:topk_group]
            allowed = [e for e in allowed if e // size in best]
        idx = sorted(allowed, key=lambda e: -sel[e])[:top_k]
        w = np.array([p[e] for e in idx])
        if norm_topk_prob:
            w = w / w.sum()
        probs.append(p)
        weights.append(w * scaling)
        indices.append(idx)
    return np.array(weights), np.array(indices), np.array(probs)


def expert(x, w_gate, w_up, w_down):
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down


def moe_forward(x, p, *, top_k, scoring="softmax", norm_topk_prob=True, scaling=1.0,
                shared=None, shared_gate=None, capacity=None, valid=None, n_group=1,
                topk_group=1):
    """x [t, d]; p: dict of float64 arrays (router [d,e], bias [e], w_gate/w_up [e,d,f],
    w_down [e,f,d]); shared: (gate, up, down) or None; shared_gate [d, 1] or None.

    capacity: None (dropless) or the per-expert capacity C; copies are admitted in GShard
    priority order (all first choices, then all second choices, ...; earlier tokens first).
    valid [t] bool (default all): with a capacity, invalid (padding) tokens take no slot and
    get no routed output. Returns (y [t, d], dropped: number of dropped valid token copies).
    """
    weights, indices, _ = route(x, p["router"], p["bias"], top_k=top_k, scoring=scoring,
                                norm_topk_prob=norm_topk_prob, scaling=scaling,
                                n_group=n_group, topk_group=topk_group)
    t, d = x.shape
    y = np.zeros((t, d))
    admitted = np.ones((t, top_k), bool)
    valid = np.ones(t, bool) if valid is None else np.asarray(valid, bool)
    if capacity is not None:
        used = {}
        for j in range(top_k):
            for i in range(t):
                if not valid[i]:
                    admitted[i, j] = False
                    continue
                e = indices[i, j]
                used[e] = used.get(e, 0) + 1
                admitted[i, j] = used[e] <= capacity
    for i in range(t):
        for j in range(top_k):
            if admitted[i, j]:
                e = indices[i, j]
                y[i] += weights[i, j] * expert(x[i], p["w_gate"][e], p["w_up"][e], p["w_down"][e])
        if shared is not None:
            s = expert(x[i], *shared)
            if shared_gate is not None:
                s = s / (1.0 + np.exp(-(x[i] @ shared_gate)[0]))
            y[i] += s
    return y, int((~admitted & valid[:, None]).sum())


def capacity_for(tokens: int, top_k: int, experts: int, factor: float) -> int:
    return max(1, math.ceil(factor * tokens * top_k / experts))


def aux_losses(x, p, *, top_k, scoring, norm_topk_prob=True):
    """(Switch load-balancing loss, z-loss, load per expert) computed token by token."""
    weights, indices, probs = route(x, p["router"], p["bias"], top_k=top_k, scoring=scoring,
                                    norm_topk_prob=norm_topk_prob, scaling=1.0)
    t, e = probs.shape
    load = np.zeros(e)
    for i in range(t):
        for j in range(top_k):
            load[indices[i, j]] += 1
    normed = probs / probs.sum(axis=1, keepdims=True)
    aux = e * np.sum(load / (t * top_k) * normed.mean(axis=0))
    z = 0.0
    for i in range(t):
        logits = x[i] @ p["router"]
        z += (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max()) ** 2
    return aux, z / t, load
