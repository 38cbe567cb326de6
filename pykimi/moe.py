"""FFNs of the Moonlight LM (spec §8.4): dense SwiGLU, the MoE router and sparse expert dispatch.

The router *returns* its decision as a :class:`RoutingRecord` (DESIGN.md style rule 5), which the model emits
under ``language_model.model.layers.{l}.mlp.routing`` and whose fields are traced under the golden names.

Sparse dispatch (:func:`moe_forward`): the (token, slot) pairs are grouped by expert id with one stable
argsort; each expert that at least one token chose has its three weights fetched through the ``get_expert``
callback exactly once per call and applied to its whole group; results are scattered back, weighted, into an
fp32 accumulator. Experts nobody chose are never fetched, so their weights are never read from disk.
A decode step (one token) hands its k experts and the shared experts to :func:`swiglu_sum` at once (its fast
twin: one C call); :func:`moe_decode` is the whole decode FFN, router included (its fast twin: one C call).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np

from . import kernels
from .errors import ConfigError
from .ops import sigmoid, silu, silu_mul, softmax


# ---------------------------------------------------------------------------------------------------------
# SwiGLU (dense layer 0, every routed expert, the shared experts)
# ---------------------------------------------------------------------------------------------------------
def dense_mlp(h: np.ndarray, gate_w, up_w, down_w) -> np.ndarray:
    """``down(silu(gate(h)) ⊙ up(h))``   # h [S, D] -> [S, D]; gate/up [I, D], down [D, I] (spec §8.4)."""
    g = kernels.matmul(h, gate_w)                                   # [S, I]
    u = kernels.matmul(h, up_w)                                     # [S, I]
    return kernels.matmul(kernels.fast(silu_mul)(g, u), down_w)     # [S, D]


def swiglu_sum(x: np.ndarray, experts, coefs, matmul=None) -> np.ndarray:
    """One token's expert FFNs, weighted and summed in expert order (spec §8.4)   # x [D] -> f32[D].

    out = Σ_k coefs[k] · down_k(silu(gate_k(x)) ⊙ up_k(x)) in fp32; experts: [(gate [I_k, D], up [I_k, D],
    down [D, I_k])] in any stored form (the routed experts with their weights, then the shared experts with
    weight 1). The products go through ``matmul`` (default kernels.matmul; tests pass kernels.reference).
    Fast twin: kernels/fused.py (the C backend: one call for the whole sum)."""
    mm = kernels.matmul if matmul is None else matmul
    x2 = np.asarray(x, dtype=np.float32).reshape(1, -1)                          # [1, D]
    check_experts(x2.shape[1], experts, coefs)
    out = np.zeros(x2.shape[1], dtype=np.float32)
    for c, (g, u, dn) in zip(coefs, experts):
        out += np.float32(c) * mm(silu(mm(x2, g)) * mm(x2, u), dn)[0]           # [D]
    return out


def check_experts(d: int, experts, coefs) -> None:
    """One-line ValueError unless every expert is (gate [I, d], up [I, d], down [d, I]) with one coefficient."""
    if len(coefs) != len(experts):
        raise ValueError(f"swiglu_sum: {len(experts)} experts but {len(coefs)} coefficients")
    for i, (g, u, dn) in enumerate(experts):
        gs = tuple(g.shape)
        if gs[1:] != (d,) or tuple(u.shape) != gs or tuple(dn.shape) != (d, gs[0]):
            raise ValueError(f"swiglu_sum: x has {d} features; expert {i} has gate {list(g.shape)}, up "
                             f"{list(u.shape)}, down {list(dn.shape)}; expected [I, {d}], [I, {d}], [{d}, I]")


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


@dataclass(frozen=True)
class RouterRule:
    """How the router picks experts (spec §8.4), read from the text config ONCE (:func:`router_rule`).

    scoring:    "sigmoid" | "softmax" (scoring_func)
    k:          experts per token (num_experts_per_tok)
    n_group, topk_group: with n_group > 1 only the topk_group best groups of experts stay selectable
    group_top2: a group's score is the sum of its top-2 choices (DeepSeek-V3 noaux_tc), else its max (V2)
    norm:       normalise the k weights to sum 1 (norm_topk_prob; only when k > 1)
    scaling:    routed_scaling_factor
    use_bias:   select on scores + e_score_correction_bias (noaux_tc); the greedy methods ignore the bias
    """
    scoring: str
    k: int
    n_group: int = 1
    topk_group: int = 1
    group_top2: bool = True
    norm: bool = True
    scaling: float = 1.0
    use_bias: bool = True

    @classmethod
    def from_config(cls, cfg) -> "RouterRule":
        """Validate the router fields of a text config (one-line ConfigError naming the field)."""
        if cfg.scoring_func not in ("sigmoid", "softmax"):
            raise ConfigError(f"config.json: text_config.scoring_func={cfg.scoring_func!r} is not supported "
                              "(expected 'sigmoid' or 'softmax')")
        method = cfg.topk_method
        if method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ConfigError(f"config.json: text_config.topk_method={method!r} is not supported "
                              "(expected 'noaux_tc', 'greedy' or 'group_limited_greedy')")
        n_group, topk_group = int(cfg.n_group or 1), int(cfg.topk_group or 1)
        E = getattr(cfg, "n_routed_experts", None)
        if n_group > 1 and E and E % n_group:
            raise ConfigError(f"config.json: n_routed_experts={E} is not divisible by n_group={n_group}")
        # DeepSeek-V3 (noaux_tc): a group's score is the sum of its top-2 bias-corrected scores; V2: its max.
        return cls(scoring=cfg.scoring_func, k=int(cfg.num_experts_per_tok), n_group=n_group,
                   topk_group=topk_group, group_top2=method == "noaux_tc", norm=bool(cfg.norm_topk_prob),
                   scaling=float(cfg.routed_scaling_factor), use_bias=method == "noaux_tc")


@lru_cache(maxsize=64)
def _rule_of(cfg) -> RouterRule:
    return RouterRule.from_config(cfg)


def router_rule(cfg) -> RouterRule:
    """The RouterRule of a text config (a RouterRule is returned as is), validated once per config: the
    model calls this at load time, so a bad router config fails there and never per token."""
    if isinstance(cfg, RouterRule):
        return cfg
    try:
        return _rule_of(cfg)
    except TypeError:                                   # an unhashable config object: no memo
        return RouterRule.from_config(cfg)


def select_experts(logits: np.ndarray, bias: np.ndarray | None, rule: RouterRule):
    """The router's selection from logits f32[S, E] (spec §8.4; DeepSeek-V3 noaux_tc and the greedy rules)
    -> (scores f32[S, E], ids i32[S, k] ascending, weights f32[S, k], margin f32[S]).

    scores = sigmoid(logits) or softmax; choice = scores + bias (bias only with rule.use_bias); with
    n_group > 1 only the topk_group best groups stay (a group's score: the sum of its top-2 choices when
    group_top2, else its max; dropped groups -inf); ids = the k best choices (stable: ties -> lower id),
    sorted; weights = their UNBIASED scores, normalised to sum 1 when norm (and k > 1), times scaling;
    margin = k-th minus (k+1)-th choice (inf when k = E). Fast twin: kernels/fused.py (Numba)."""
    logits = np.asarray(logits, dtype=np.float32)
    S, E = logits.shape
    k, n_group = rule.k, rule.n_group
    scores = sigmoid(logits) if rule.scoring == "sigmoid" else softmax(logits, axis=-1)    # [S, E]
    choice = scores + np.asarray(bias, dtype=np.float32)[None, :] if bias is not None else scores.copy()
    if n_group > 1:
        g = choice.reshape(S, n_group, E // n_group)                                      # [S, G, E/G]
        group_score = np.sort(g, axis=-1)[..., -2:].sum(axis=-1) if rule.group_top2 else g.max(axis=-1)
        keep = np.argsort(-group_score, axis=-1, kind="stable")[:, :rule.topk_group]      # [S, topk_group]
        gmask = np.zeros((S, n_group), dtype=bool)
        np.put_along_axis(gmask, keep, True, axis=-1)
        # Dropped groups get -inf (HF fills 0.0, spec §11.6; identical whenever scores are positive).
        choice = np.where(np.repeat(gmask, E // n_group, axis=-1), choice, -np.inf).astype(np.float32)
    order = np.argsort(-choice, axis=-1, kind="stable")                                    # [S, E] best first
    kth = np.take_along_axis(choice, order[:, k - 1:k], axis=-1)[:, 0]
    if k < E:
        margin = (kth - np.take_along_axis(choice, order[:, k:k + 1], axis=-1)[:, 0]).astype(np.float32)
    else:
        margin = np.full(S, np.inf, dtype=np.float32)
    ids = np.sort(order[:, :k], axis=-1)                                                   # [S, k] ascending
    weights = np.take_along_axis(scores, ids, axis=-1).astype(np.float32)                  # unbiased scores
    if rule.norm and k > 1:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + np.float32(1e-20))
    weights = weights * np.float32(rule.scaling)
    return scores.astype(np.float32, copy=False), ids.astype(np.int32), weights.astype(np.float32), margin


def route(h: np.ndarray, gate_w, bias: np.ndarray | None, cfg) -> RoutingRecord:
    """Pick experts for tokens ``h`` [S, D] (spec §8.4; DeepSeek-V3 ``noaux_tc``).

    gate_w: [E, D] (widened to f32: router in fp32), bias: f32[E] e_score_correction_bias or None,
    cfg: a :class:`RouterRule` or the text config (scoring_func, topk_method, n_group, topk_group,
    num_experts_per_tok, norm_topk_prob, routed_scaling_factor), see :func:`router_rule`.
    """
    logits = kernels.matmul(np.asarray(h, dtype=np.float32), gate_w).astype(np.float32, copy=False)  # [S, E]
    return route_logits(logits, bias, cfg)


def route_logits(logits: np.ndarray, bias: np.ndarray | None, cfg) -> RoutingRecord:
    """The selection part of :func:`route`, from router logits f32[S, E] (e.g. edited through a trace)."""
    rule = router_rule(cfg)
    logits = np.asarray(logits, dtype=np.float32)
    S, E = logits.shape
    if not 0 < rule.k <= E or (rule.n_group > 1 and E % rule.n_group):
        raise ConfigError(f"router: {E} experts cannot give top-{rule.k} in {rule.n_group} equal groups "
                          "(config.json: num_experts_per_tok, n_routed_experts, n_group)")
    if not rule.use_bias:
        bias = None                                      # the bias is for noaux_tc's selection only
    elif bias is None:
        raise ConfigError("checkpoint: topk_method 'noaux_tc' needs mlp.gate.e_score_correction_bias")
    scores, ids, weights, margin = kernels.fast(select_experts)(logits, bias, rule)
    return RoutingRecord(logits=logits, scores=scores, topk_ids=ids, topk_weights=weights, topk_margin=margin)


def moe_decode(h: np.ndarray, gate_w, bias: np.ndarray | None, cfg, get_expert: "ExpertGetter",
               shared: tuple | None = None, n_experts: int | None = None):
    """One decode token's whole MoE FFN: :func:`route`, then :func:`moe_forward` (spec §8.4)
    # h [1, D] -> (f32[1, D], RoutingRecord).

    The record is returned as route returns it, so traces and notebooks read the decision. Fast twin:
    kernels/fused.py (pk_moe: router GEMV, selection and every chosen + shared expert in ONE C call, over a
    table of the layer's expert records kept between tokens; an expert is still resolved -- read -- only
    the first time a token chooses it)."""
    rec = route(h, gate_w, bias, cfg)
    return moe_forward(h, rec, get_expert, shared, n_experts=n_experts), rec


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
        # decode: one token, k distinct experts -> the whole FFN as one swiglu_sum (one C call when fast), the
        # routed experts in ascending id order, then the shared experts with weight 1 (as the loop below)
        ids = record.topk_ids[0]
        order = np.argsort(ids, kind="stable")
        experts = [tuple(get_expert(int(ids[j]))) for j in order]
        coefs = [float(record.topk_weights[0, j]) for j in order]
        if shared is not None:
            experts.append(tuple(shared))
            coefs.append(1.0)
        return kernels.fast(swiglu_sum)(h[0], experts, coefs)[None, :]
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
    acts = [kernels.fast(silu_mul)(gu[2 * i], gu[2 * i + 1]) for i in range(len(groups))]   # [n_e, I]
    ys = kernels.matmul_many(acts, [g[4] for g in groups])                  # [n_e, D]
    out = np.zeros((S, D), dtype=np.float32)
    for g, y in zip(groups, ys):
        if g[0] is None:
            continue
        out[g[1]] += flat_w[g[0]][:, None] * y                              # weighted scatter-add, fp32
    if shared is not None:
        out += ys[-1]                                                       # shared experts, weight 1
    return out
