"""FFNs of the Moonlight LM (spec §8.4): dense SwiGLU, the MoE router and sparse expert dispatch.

The router *returns* its decision as a :class:`RoutingRecord` (DESIGN.md style rule 5), which the model emits
under ``language_model.model.layers.{l}.mlp.routing`` and whose fields are traced under the golden names.

Sparse dispatch (:func:`moe_forward`): the (token, slot) pairs are grouped by expert id with one stable
argsort; each expert that at least one token chose has its three weights fetched through the ``get_expert``
callback exactly once per call and applied to its whole group; results are scattered back, weighted, into an
fp32 accumulator. Experts nobody chose are never fetched, so their weights are never read from disk.
A decode step (one token) hands its k experts and the shared experts to kernels.swiglu_sum at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import kernels
from .errors import ConfigError
from .ops import silu


# ---------------------------------------------------------------------------------------------------------
# SwiGLU (dense layer 0, every routed expert, the shared experts)
# ---------------------------------------------------------------------------------------------------------
def dense_mlp(h: np.ndarray, gate_w, up_w, down_w) -> np.ndarray:
    """``down(silu(gate(h)) ⊙ up(h))``   # h [S, D] -> [S, D]; gate/up [I, D], down [D, I] (spec §8.4)."""
    g = kernels.matmul(h, gate_w)                                   # [S, I]
    u = kernels.matmul(h, up_w)                                     # [S, I]
    return kernels.matmul(silu(g) * u, down_w)                      # [S, D]


# ---------------------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RoutingRecord:
    """The router's decision for S tokens (E routed experts, k per token).

    logits:       f32[S, E]  h·W_gᵀ in fp32 (traced as ``mlp.gate.router_logits``)
    scores:       f32[S, E]  sigmoid(logits) (or softmax), unbiased
    topk_ids:     i32[S, k]  chosen experts, sorted ascending per token
    topk_weights: f32[S, k]  in the order of topk_ids: normalised unbiased scores × routed_scaling_factor
    topk_margin:  f32[S]     k-th minus (k+1)-th selection score (bias-corrected): the near-tie indicator
    """
    logits: np.ndarray
    scores: np.ndarray
    topk_ids: np.ndarray
    topk_weights: np.ndarray
    topk_margin: np.ndarray

    def expert_counts(self, n_experts: int) -> np.ndarray:
        """How many tokens chose each expert   # i64[E]."""
        return np.bincount(self.topk_ids.ravel(), minlength=n_experts)


def route(h: np.ndarray, gate_w, bias: np.ndarray | None, cfg) -> RoutingRecord:
    """Pick experts for tokens ``h`` [S, D] (spec §8.4; DeepSeek-V3 ``noaux_tc``).

    gate_w: [E, D] (widened to f32: router in fp32), bias: f32[E] e_score_correction_bias or None,
    cfg: the text config (scoring_func, topk_method, n_group, topk_group, num_experts_per_tok, norm_topk_prob,
    routed_scaling_factor).
    """
    logits = kernels.matmul(np.asarray(h, dtype=np.float32), gate_w).astype(np.float32, copy=False)  # [S, E]
    return route_logits(logits, bias, cfg)


def route_logits(logits: np.ndarray, bias: np.ndarray | None, cfg) -> RoutingRecord:
    """The selection part of :func:`route`, from router logits f32[S, E] (e.g. edited through a trace)."""
    k = int(cfg.num_experts_per_tok)
    logits = np.asarray(logits, dtype=np.float32)
    S, E = logits.shape

    if cfg.scoring_func not in ("sigmoid", "softmax"):
        raise ConfigError(f"config.json: text_config.scoring_func={cfg.scoring_func!r} is not supported "
                          "(expected 'sigmoid' or 'softmax')")
    method = cfg.topk_method
    if method == "noaux_tc":
        if bias is None:
            raise ConfigError("checkpoint: topk_method 'noaux_tc' needs mlp.gate.e_score_correction_bias")
    elif method in ("greedy", "group_limited_greedy"):
        bias = None                                      # the bias is for noaux_tc's selection only
    else:
        raise ConfigError(f"config.json: text_config.topk_method={method!r} is not supported "
                          "(expected 'noaux_tc', 'greedy' or 'group_limited_greedy')")
    n_group, topk_group = int(cfg.n_group or 1), int(cfg.topk_group or 1)
    if n_group > 1 and E % n_group:
        raise ConfigError(f"config.json: n_routed_experts={E} is not divisible by n_group={n_group}")
    # DeepSeek-V3 (noaux_tc): a group's score is the sum of its top-2 bias-corrected scores; V2: its max.
    scores, ids, weights, margin = kernels.route_select(
        logits, bias, cfg.scoring_func, k, n_group, topk_group, method == "noaux_tc", bool(cfg.norm_topk_prob),
        float(cfg.routed_scaling_factor))
    return RoutingRecord(logits=logits, scores=scores, topk_ids=ids, topk_weights=weights, topk_margin=margin)


# ---------------------------------------------------------------------------------------------------------
# Sparse dispatch
# ---------------------------------------------------------------------------------------------------------
ExpertGetter = Callable[[int], tuple]  # e -> (gate_w [I, D], up_w [I, D], down_w [D, I])


def dispatch_plan(topk_ids: np.ndarray, n_experts: int):
    """Group (token, slot) pairs by expert   # topk_ids [S, k].

    Returns (order, offsets): ``order`` are flat indices into topk_ids.ravel() sorted by expert (stable, so
    tokens stay in order inside a group); expert e's pairs are order[offsets[e]:offsets[e+1]].
    """
    flat = topk_ids.ravel()
    order = np.argsort(flat, kind="stable")                                 # counting sort by expert id
    counts = np.bincount(flat, minlength=n_experts)
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return order, offsets


def moe_forward(h: np.ndarray, record: RoutingRecord, get_expert: ExpertGetter,
                shared: tuple | None = None, n_experts: int | None = None) -> np.ndarray:
    """Routed experts (+ shared experts) for tokens ``h`` [S, D]   -> [S, D] (spec §8.4).

    out[s] = Σ_j w[s, j] · expert_{ids[s, j]}(h[s])  (accumulated in fp32)  +  shared(h[s]) with weight 1.
    ``get_expert(e)`` is called once for each expert chosen by at least one token, never for the others.
    """
    S, D = h.shape
    k = record.topk_ids.shape[1]
    E = int(n_experts if n_experts is not None else record.logits.shape[1])
    if S == 1:
        # decode: one token, k distinct experts -> the whole FFN in one kernel call (kernels.swiglu_sum), the
        # routed experts in ascending id order, then the shared experts with weight 1 (as the loop below)
        ids = record.topk_ids[0]
        order = np.argsort(ids, kind="stable")
        experts = [tuple(get_expert(int(ids[j]))) for j in order]
        coefs = [float(record.topk_weights[0, j]) for j in order]
        if shared is not None:
            experts.append(tuple(shared))
            coefs.append(1.0)
        return kernels.swiglu_sum(h[0], experts, coefs)[None, :]
    order, offsets = dispatch_plan(record.topk_ids, E)
    flat_w = record.topk_weights.ravel()
    chosen = np.nonzero(offsets[1:] > offsets[:-1])[0]                      # only experts someone chose
    groups = []                                                             # (pairs, tokens, gate, up, down)
    for e in chosen:
        pairs = order[offsets[e]:offsets[e + 1]]                            # flat (token*k + slot) indices
        groups.append((pairs, pairs // k) + tuple(get_expert(int(e))))      # tokens distinct (ids unique per row)
    if shared is not None:
        groups.append((None, slice(None)) + tuple(shared))                  # shared experts: every token
    # All experts' products go to the kernels together (one C call / one thread fork-join per phase when
    # the groups are small, as in decode); the arithmetic is exactly dense_mlp's, expert by expert.
    xs = [h[g[1]] for g in groups]                                          # [n_e, D] each
    gu = kernels.matmul_many([x for x in xs for _ in (0, 1)],
                             [w for g in groups for w in (g[2], g[3])])     # gate, up of every group
    acts = [silu(gu[2 * i]) * gu[2 * i + 1] for i in range(len(groups))]    # [n_e, I]
    ys = kernels.matmul_many(acts, [g[4] for g in groups])                  # [n_e, D]
    out = np.zeros((S, D), dtype=np.float32)
    for g, y in zip(groups, ys):
        if g[0] is None:
            continue
        out[g[1]] += flat_w[g[0]][:, None] * y                              # weighted scatter-add, fp32
    if shared is not None:
        out += ys[-1]                                                       # shared experts, weight 1
    return out
