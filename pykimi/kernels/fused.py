"""Fast twins of the stage definitions, registered under the definition's name.

A stage's NumPy definition lives in its stage file (ops.rms_norm / add_rms_norm, attention.mla_absorbed,
moe.swiglu_sum, moe.select_experts); its twin is registered here with ``@twin_of("pykimi.module.function")``
and a call site asks for ``fast(definition)(...)``. A twin is called as twin(definition, *args): it runs the
backend's kernel when it can and the definition otherwise (numpy backend, a form or size the kernel does not
take). The tests hold every twin to its definition (tests/test_kernels.py).
"""
from __future__ import annotations

import functools

import numpy as np

from .linear import _C_KINDS, _act_mode, _kind, _owned, act_quant
from .probe import _mods, backend, numba_module

_CHECKS: list = []     # (attention.check_absorbed, moe.check_experts), looked up on first use: those
                       # modules import kernels, so kernels cannot import them while it loads


def _checks() -> list:
    if not _CHECKS:
        from ..attention import check_absorbed
        from ..moe import check_experts
        _CHECKS.extend((check_absorbed, check_experts))
    return _CHECKS


_TWINS: dict = {}      # "pykimi.ops.rms_norm" -> twin(definition, *args)
_FAST: dict = {}       # definition -> its fast version, bound on first ask


def twin_of(name: str):
    """Decorator: register the function as the fast twin of the definition called ``name`` (module.function)."""
    def register(fn):
        _TWINS[name] = fn
        return fn
    return register


def fast(definition):
    """The fast version of a stage definition: its registered twin bound to it (the twin falls back to the
    definition for a backend or input its kernel does not take), or the definition itself when it has none."""
    f = _FAST.get(definition)
    if f is None:
        twin = _TWINS.get(f"{definition.__module__}.{definition.__qualname__}")
        f = _FAST[definition] = functools.partial(twin, definition) if twin is not None else definition
    return f


def twins() -> dict:
    """{definition name: twin name} of every registered fast twin (README "Map of the code")."""
    return {name: f"{fn.__module__}.{fn.__qualname__}" for name, fn in _TWINS.items()}


@twin_of("pykimi.moe.swiglu_sum")
def swiglu_sum(definition, x, experts, coefs, matmul=None) -> np.ndarray:
    """One token's MoE FFN with the C backend and every weight in a stored form it reads: ONE kernel call
    (pk_swiglu_sum: gate+up rows of all experts in one parallel region, silu * up in C, down rows in a second
    region, the weighted sum in expert order) -- a decode step used to come back to Python between the phases.
    Otherwise the definition."""
    if backend() == "c" and experts and matmul is None:
        x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
        recs = _c_experts(experts, coefs, x.shape[0])
        if recs is not None:
            return _mods["c"].swiglu_sum(x, recs, coefs)
    return definition(x, experts, coefs, matmul)


def _c_experts(experts, coefs, d: int):
    """The C records (c.expert_record) of experts [(gate, up, down)] for x of width d, or None when one is not
    in a form the C kernels read. A record is made once per expert and activation setting and kept on its
    gate weight, with the up and down objects it was made for: a decode step hands over 7 experts a layer,
    and re-deriving their kinds, modes and pointers was the larger part of its Python time."""
    check_experts = _checks()[1]             # the definition's checks (the C kernel reads raw rows)
    if len(coefs) != len(experts):
        check_experts(d, experts, coefs)
    setting = act_quant()
    out = []
    for e in experts:
        g, u, dn = e
        got = getattr(g, "_c_expert", None)
        if got is None or got[0] != setting or got[1] is not u or got[2] is not dn:
            check_experts(d, [e], [1.0])
            kind = _kind(g)
            if kind not in _C_KINDS or _kind(u) != kind or _kind(dn) != kind:
                return None
            rec = _mods["c"].expert_record(kind, _act_mode(kind), _owned(g, kind), _owned(u, kind),
                                           _owned(dn, kind))
            got = (setting, u, dn, d, rec)
            if hasattr(g, "__dict__"):
                object.__setattr__(g, "_c_expert", got)   # frozen weight objects: a derived, immutable cache
        elif got[3] != d:
            check_experts(d, [e], [1.0])
        out.append(got[4])
    return out


@twin_of("pykimi.attention.mla_absorbed")
def mla_absorbed(definition, q, kva, ln, eps: float, inv_freq, pos: int, rows: np.ndarray, n: int, kv_b,
                 scale: float, dims, matmul=None) -> np.ndarray:
    """One decode token's absorbed MLA attention in one C call (pk_mla_absorbed: heads in parallel, W_uk /
    W_uv read in the stored form) with the C backend; otherwise the definition."""
    kind = _kind(kv_b)
    if backend() == "c" and kind in _C_KINDS and matmul is None:
        _checks()[0](q, kva, rows, n, pos, kv_b, dims)   # the definition's checks (C writes rows[n])
        return _mods["c"].mla_absorbed(np.asarray(q, dtype=np.float32).reshape(-1),
                                       np.asarray(kva, dtype=np.float32).reshape(-1), ln, eps, inv_freq, pos,
                                       rows, n, kind, _act_mode(kind), *_owned(kv_b, kind), scale,
                                       tuple(map(int, dims))).reshape(-1)
    return definition(q, kva, ln, eps, inv_freq, pos, rows, n, kv_b, scale, dims, matmul)


@twin_of("pykimi.ops.rms_norm")
def rms_norm(definition, x, weight, eps: float) -> np.ndarray:
    """Numba: one pass for the sum of squares (f64), one to write; the definition's rounding otherwise."""
    nb = numba_module()
    if nb is None:
        return definition(x, weight, eps)
    x = np.asarray(x, dtype=np.float32)
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    nb.rms_norm(x2, np.ascontiguousarray(weight, dtype=np.float32), float(eps), out)
    return out.reshape(x.shape)


@twin_of("pykimi.ops.add_rms_norm")
def add_rms_norm(definition, x, a, weight, eps: float):
    """(x + a, rms_norm(x + a, weight, eps)) in one Numba pass   # x, a [..., d]."""
    nb = numba_module()
    x = np.asarray(x, dtype=np.float32)
    a = np.asarray(a, dtype=np.float32)
    if nb is None or x.shape != a.shape or x.ndim == 0:
        return definition(x, a, weight, eps)
    d = x.shape[-1]
    xo = np.empty(x.shape, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    nb.add_rms_norm(np.ascontiguousarray(x).reshape(-1, d), np.ascontiguousarray(a).reshape(-1, d),
                    np.ascontiguousarray(weight, dtype=np.float32), float(eps), xo.reshape(-1, d), out.reshape(-1, d))
    return xo, out


@twin_of("pykimi.moe.select_experts")
def select_experts(definition, logits, bias, rule):
    """The router's selection in one Numba call per batch instead of ~25 NumPy calls -- at 27 layers per
    decoded token that glue was ~0.2 ms a layer."""
    nb = numba_module()
    logits = np.ascontiguousarray(logits, dtype=np.float32)
    S, E = logits.shape
    if nb is None or rule.scoring not in ("sigmoid", "softmax") or not 0 < rule.k <= E or E % max(rule.n_group, 1):
        return definition(logits, bias, rule)
    b = np.zeros(E, np.float32) if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    scores = np.empty((S, E), np.float32)
    ids = np.empty((S, rule.k), np.int32)
    weights = np.empty((S, rule.k), np.float32)
    margin = np.empty(S, np.float32)
    nb.route_select(logits, b, rule.scoring == "sigmoid", int(rule.k), max(int(rule.n_group), 1),
                    int(rule.topk_group), bool(rule.group_top2), bool(rule.norm), float(rule.scaling), scores, ids,
                    weights, margin)
    return scores, ids, weights, margin
