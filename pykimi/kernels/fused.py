"""Fast twins of the stage definitions, registered under the definition's name.

A stage's NumPy definition lives in its stage file (ops.rms_norm / add_rms_norm, attention.mla_absorbed /
mla_absorbed_out, moe.swiglu_sum, moe.select_experts, moe.route, moe.moe_decode, model.decode_layer / decode_layers);
its twin is registered here with ``@twin_of("pykimi.module.function")``
and a call site asks for ``fast(definition)(...)``. A twin is called as twin(definition, *args): it runs the
backend's kernel when it can and the definition otherwise (numpy backend, a form or size the kernel does not
take). The tests hold every twin to its definition (tests/test_kernels.py).
"""
from __future__ import annotations

import functools
import weakref

import numpy as np

from .linear import _C_KINDS, _act_mode, _kind, _owned, act_quant, plan
from .probe import _mods, backend, numba_module

_CHECKS: list = []     # (attention.check_absorbed, moe.check_experts), looked up on first use: those
                       # modules import kernels, so kernels cannot import them while it loads


def _checks() -> list:
    if not _CHECKS:
        from ..attention import check_absorbed, check_out_proj
        from ..moe import RoutingRecord, check_experts, route_logits, router_rule
        _CHECKS.extend((check_absorbed, check_experts, check_out_proj, RoutingRecord, route_logits, router_rule))
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
    """One decode token's absorbed MLA attention in one C call (pk_mla_absorbed: one pass over the cache, its
    rows split between the threads, W_uk / W_uv read in the stored form) with the C backend; otherwise the
    definition."""
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
    """Numba: one pass for the sum of squares (f64), one to write; without Numba, the C backend's pk_rms_norm
    (the same loop, bit for bit: pk_decode_layer normalises with it); the definition's rounding otherwise."""
    nb = numba_module()
    c = _mods.get("c") if nb is None and backend() == "c" else None
    if nb is None and c is None:
        return definition(x, weight, eps)
    x = np.asarray(x, dtype=np.float32)
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.shape != (x2.shape[1],):
        return definition(x, weight, eps)
    if nb is not None:
        nb.rms_norm(x2, w, float(eps), out)
    else:
        p = c.ffi.from_buffer
        c.lib.pk_rms_norm(p("float[]", x2), x2.shape[0], x2.shape[1], p("float[]", w), float(eps), p("float[]", out))
    return out.reshape(x.shape)


@twin_of("pykimi.ops.silu_mul")
def silu_mul(definition, g, u) -> np.ndarray:
    """The C backend's pk_silu_mul (the decode MoE's vector exp, ~1 ulp; on the threads for big arrays) for f32
    arrays of one shape; the definition otherwise."""
    c = _mods.get("c") if backend() == "c" else None
    if c is None or not (isinstance(g, np.ndarray) and isinstance(u, np.ndarray)) or g.shape != u.shape \
            or g.dtype != np.float32 or u.dtype != np.float32:
        return definition(g, u)
    g2, u2 = np.ascontiguousarray(g), np.ascontiguousarray(u)
    out = np.empty_like(g2)
    p = c.ffi.from_buffer
    c.lib.pk_silu_mul(p("float[]", g2), p("float[]", u2), g2.size, p("float[]", out))
    return out


@twin_of("pykimi.ops.exp_rows")
def exp_rows(definition, s) -> np.ndarray:
    """The C backend's pk_exp_rows (two passes a row, the vector exp, one thread: the vision attention calls it
    from its worker threads) on f32 [b, n] rows with a unit last stride; the definition otherwise."""
    c = _mods.get("c") if backend() == "c" else None
    if c is None or not isinstance(s, np.ndarray) or s.dtype != np.float32 or s.ndim != 2 \
            or s.strides[1] != 4 or s.strides[0] % 4 or not s.flags.writeable or 0 in s.shape:
        return definition(s)
    den = np.empty((s.shape[0], 1), dtype=np.float32)
    c.lib.pk_exp_rows(c.ffi.cast("float *", s.ctypes.data), s.shape[0], s.shape[1], s.strides[0] // 4,
                      c.ffi.cast("float *", den.ctypes.data))
    return den


@twin_of("pykimi.ops.gelu_tanh")
def gelu_tanh(definition, x) -> np.ndarray:
    """The C backend's pk_gelu_tanh (one pass, the vector exp, one thread: the vision block calls it from its
    worker threads) on a contiguous f32 array; the definition otherwise."""
    c = _mods.get("c") if backend() == "c" else None
    if c is None or not isinstance(x, np.ndarray) or x.dtype != np.float32 or not x.flags.c_contiguous:
        return definition(x)
    out = np.empty_like(x)
    if x.size:
        p = c.ffi.from_buffer
        c.lib.pk_gelu_tanh(p("float[]", x), x.size, p("float[]", out))
    return out


@twin_of("pykimi.ops.add_rms_norm")
def add_rms_norm(definition, x, a, weight, eps: float):
    """(x + a, rms_norm(x + a, weight, eps)) in one Numba pass   # x, a [..., d] (without Numba, the C
    backend's pk_add_rms_norm: the same loop)."""
    nb = numba_module()
    c = _mods.get("c") if nb is None and backend() == "c" else None
    x = np.asarray(x, dtype=np.float32)
    a = np.asarray(a, dtype=np.float32)
    if (nb is None and c is None) or x.shape != a.shape or x.ndim == 0:
        return definition(x, a, weight, eps)
    d = x.shape[-1]
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.shape != (d,):
        return definition(x, a, weight, eps)
    xo = np.empty(x.shape, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.float32)
    x2, a2 = np.ascontiguousarray(x).reshape(-1, d), np.ascontiguousarray(a).reshape(-1, d)
    if nb is not None:
        nb.add_rms_norm(x2, a2, w, float(eps), xo.reshape(-1, d), out.reshape(-1, d))
    else:
        p = c.ffi.from_buffer
        c.lib.pk_add_rms_norm(p("float[]", x2), p("float[]", a2), x2.shape[0], d, p("float[]", w), float(eps),
                              p("float[]", xo), p("float[]", out))
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


@twin_of("pykimi.attention.mla_absorbed_out")
def mla_absorbed_out(definition, q, kva, ln, eps: float, inv_freq, pos: int, rows: np.ndarray, n: int, kv_b,
                     o_proj, scale: float, dims, matmul=None) -> np.ndarray:
    """One decode token's absorbed attention AND o_proj in one C call (pk_mla_absorbed_o: o_proj's rows in the
    attention's parallel region, bit for bit kernels.matmul of the one row) with the C backend, when
    kernels.matmul would run o_proj on the C kernels; otherwise the definition."""
    kind, okind = _kind(kv_b), _kind(o_proj)
    if backend() == "c" and kind in _C_KINDS and okind in _C_KINDS and matmul is None:
        path, oact = plan(okind, 1)
        if path == "c":
            ck = _checks()
            ck[0](q, kva, rows, n, pos, kv_b, dims)   # the definition's checks (C writes rows[n])
            ck[2](o_proj, dims)
            c = _mods["c"]
            orec = c.linear_record(okind, oact, o_proj.shape, *_owned(o_proj, okind))
            return c.mla_absorbed_o(np.asarray(q, dtype=np.float32).reshape(-1),
                                    np.asarray(kva, dtype=np.float32).reshape(-1), ln, eps, inv_freq, pos, rows, n,
                                    kind, _act_mode(kind), *_owned(kv_b, kind), scale, tuple(map(int, dims)), orec)
    return definition(q, kva, ln, eps, inv_freq, pos, rows, n, kv_b, o_proj, scale, dims, matmul)


# ------------------------------------------------------------------------------------------ the router
_GATES: dict = {}      # id(f32 ndarray gate) -> (weakref to it, its pk_linear record): an ndarray takes no attribute


def _gate_record(gate_w):
    """The pk_linear record of a router weight [E, d] (an f32 ndarray or a stored form the C kernels read),
    made once per weight and kept; None when C cannot read it as it is."""
    c = _mods["c"]
    if isinstance(gate_w, np.ndarray):
        if gate_w.dtype != np.float32 or gate_w.ndim != 2 or not gate_w.flags.c_contiguous:
            return None
        got = _GATES.get(id(gate_w))
        if got is not None and got[0]() is gate_w:
            return got[1]
        if len(_GATES) > 4096:
            _GATES.clear()
        rec = c.linear_record("f32", "f32", gate_w.shape, gate_w, None)
        _GATES[id(gate_w)] = (weakref.ref(gate_w), rec)
        return rec
    kind = _kind(gate_w)
    if kind not in _C_KINDS or len(gate_w.shape) != 2:
        return None
    path, act = plan(kind, 1)
    return c.linear_record(kind, act if path == "c" else "f32", gate_w.shape, *_owned(gate_w, kind))


def _router_args(h, gate_w, bias, cfg):
    """(x [S, d], gate record, bias or None, rule) for the C router, or None when it does not take these (the
    definition then runs, and raises its one-line errors for a bad rule or a missing bias)."""
    rule = _checks()[5](cfg)
    h = np.asarray(h)
    if h.ndim != 2 or rule.scoring not in ("sigmoid", "softmax"):
        return None
    E = int(gate_w.shape[0]) if len(gate_w.shape) == 2 else 0
    if not 0 < rule.k <= E or E % max(rule.n_group, 1) or int(gate_w.shape[1]) != h.shape[1]:
        return None
    if rule.use_bias:
        if bias is None:
            return None
        bias = np.ascontiguousarray(bias, dtype=np.float32)
        if bias.shape != (E,):
            return None
    else:
        bias = None                                 # the bias is for noaux_tc's selection only
    grec = _gate_record(gate_w)
    if grec is None:
        return None
    return np.ascontiguousarray(h, dtype=np.float32), grec, bias, rule


def _rule_args(rule) -> tuple:
    return (int(rule.k), max(int(rule.n_group), 1), int(rule.topk_group), bool(rule.group_top2), bool(rule.norm),
            float(rule.scaling), rule.scoring == "sigmoid")


@twin_of("pykimi.moe.route")
def route(definition, h, gate_w, bias, cfg):
    """The router of S tokens in one C call (pk_route: each row's logits a GEMV of that row alone, then the
    selection of select_experts) with the C backend: the serve engine's batched step routes its rows with
    the same arithmetic as a single decode step's pk_moe. Otherwise the definition."""
    if backend() == "c":
        args = _router_args(h, gate_w, bias, cfg)
        if args is not None:
            x, grec, b, rule = args
            E = int(gate_w.shape[0])
            logits, scores, ids, weights, margin = _mods["c"].route(x, grec, b, E, *_rule_args(rule))
            return _checks()[3](logits=logits, scores=scores, topk_ids=ids, topk_weights=weights,
                                topk_margin=margin)
    return definition(h, gate_w, bias, cfg)


class _ExpertTable:
    """A layer's pk_expert records of all E routed experts for pk_moe, made once and kept (on the layer's
    get_expert). A record is filled the first time a token chooses its expert (get_expert resolves -- reads
    -- it then, as the unfused path does); NULL records are the ones nobody chose yet. The table is emptied
    when the checkpoint's read generation or the activation setting changes (the records depend on both)."""

    def __init__(self, E: int, d: int, shared, setting, generation):
        c = _mods["c"]
        self.E, self.d, self.setting, self.generation = E, d, setting, generation
        self.arr = c.ffi.new("pk_expert[]", E)
        self.keep: dict = {}
        self.shared = None
        self.n_shared = 0
        if shared is not None:
            recs = _c_experts([tuple(shared)], [1.0], d)
            if recs is None:
                raise LookupError("shared experts in a form the C kernels do not read")
            self.shared = c.ffi.new("pk_expert[]", [recs[0][0][0]])
            self.n_shared = 1
            self.keep["shared"] = recs

    def fill(self, e: int, get_expert) -> bool:
        recs = _c_experts([tuple(get_expert(e))], [1.0], self.d)
        if recs is None:
            return False
        self.arr[e] = recs[0][0][0]
        self.keep[e] = recs
        return True


def _expert_table(get_expert, shared, E: int, d: int):
    gen_of = getattr(get_expert, "generation", None)
    gen = gen_of() if gen_of is not None else 0
    setting = act_quant()
    tab = getattr(get_expert, "_c_table", None)
    if (tab is None or tab.E != E or tab.d != d or tab.setting != setting or tab.generation != gen
            or tab.keep.get("shared_obj") is not shared):
        try:
            tab = _ExpertTable(E, d, shared, setting, gen)
        except LookupError:
            return None
        tab.keep["shared_obj"] = shared
        if hasattr(get_expert, "__dict__"):
            get_expert._c_table = tab
    return tab


@twin_of("pykimi.moe.moe_decode")
def moe_decode(definition, h, gate_w, bias, cfg, get_expert, shared=None, n_experts=None):
    """One decode token's MoE FFN in ONE C call with the C backend (pk_moe: the router GEMV, the selection,
    every chosen expert and the shared experts, over the layer's table of expert records). An expert chosen
    for the first time is resolved between two calls (pk_moe returns 1 after routing; the selection is
    recomputed the same). Otherwise, and for weights C does not read, the definition."""
    if backend() == "c" and np.ndim(h) == 2 and np.shape(h)[0] == 1:
        args = _router_args(h, gate_w, bias, cfg)
        E = int(gate_w.shape[0])
        if args is not None and (n_experts is None or int(n_experts) == E):
            x, grec, b, rule = args
            tab = _expert_table(get_expert, shared, E, x.shape[1])
            if tab is not None:
                got = _moe_call(x, grec, b, rule, tab, get_expert)
                if got is not None:
                    return got
    return definition(h, gate_w, bias, cfg, get_expert, shared, n_experts)


def _moe_call(x, grec, b, rule, tab, get_expert):
    c = _mods["c"]
    ffi, p = c.ffi, c._ptr
    E, d = tab.E, tab.d
    k = int(rule.k)
    logits = np.empty((1, E), np.float32)
    scores = np.empty((1, E), np.float32)
    ids = np.empty((1, k), np.int32)
    weights = np.empty((1, k), np.float32)
    margin = np.empty(1, np.float32)
    out = np.empty((1, d), np.float32)
    for _ in range(2):
        rc = c.lib.pk_moe(p("float[]", x), d, grec[0], p("float[]", b) if b is not None else ffi.NULL, E,
                          *_rule_args(rule), tab.arr, tab.n_shared, tab.shared if tab.shared is not None else ffi.NULL,
                          p("float[]", logits), p("float[]", scores), p("int[]", ids), p("float[]", weights),
                          p("float[]", margin), p("float[]", out))
        if rc == 0:
            return out, _checks()[3](logits=logits, scores=scores, topk_ids=ids, topk_weights=weights,
                                     topk_margin=margin)
        if rc != 1:
            raise (MemoryError if rc == -1 else ValueError)(f"pk_moe failed ({rc})")
        for e in ids[0]:                           # chosen for the first time: resolve, then route again
            if tab.arr[int(e)].g == ffi.NULL and not tab.fill(int(e), get_expert):
                return None
    raise RuntimeError("pk_moe: expert records still missing after they were filled")


# ------------------------------------------------------------------------------------ one decoder layer
class _LayerRecord:
    """A decoder layer's pk_layer record for pk_decode_layer, made once per layer and kept on its
    LayerWeights (``_c_layer``): the dims, the norms, every linear's pk_linear, kv_b_proj's pointers, the
    dense MLP's pk_expert or the router's record + the layer's table of expert records (_expert_table). What
    the record was made for is kept beside it (the activation setting, the weight objects, the expert
    table): a change of any of them makes a new record (the table follows the read generation)."""

    def __init__(self, lw, cfg, setting):
        c = _mods["c"]
        a = lw.attn
        H, dn, dr, dv, R = (int(cfg.num_attention_heads), int(cfg.qk_nope_head_dim), int(cfg.qk_rope_head_dim),
                            int(cfg.v_head_dim), int(cfg.kv_lora_rank))
        D = int(cfg.hidden_size)
        self.setting, self.D, self.E, self.k = setting, D, 0, 0
        self.keep: list = []                       # everything the record points into
        L = self.rec = c.ffi.new("pk_layer *")
        L.D, L.H, L.dn, L.dr, L.dv, L.R = D, H, dn, dr, dv, R
        L.q_lora = int(cfg.q_lora_rank or 0)
        L.eps, L.kv_eps, L.scale = float(cfg.rms_norm_eps), float(cfg.kv_a_layernorm_eps), float(cfg.qk_head_dim) ** -0.5
        self.weights = (lw.input_layernorm, lw.post_attention_layernorm, a.kv_a_layernorm, a.q_a_layernorm,
                        a.q_proj, a.q_a_proj, a.q_b_proj, a.kv_a_proj_with_mqa, a.kv_b_proj, a.o_proj, lw.mlp,
                        lw.gate_w, lw.gate_bias, lw.shared)

        def vec(v, size):                          # a norm weight / inv_freq as a kept f32 [size] pointer
            v = np.ascontiguousarray(v, dtype=np.float32)
            if v.shape != (size,):
                raise LookupError
            self.keep.append(v)
            return c.ffi.cast("float *", c._ptr("float[]", v))

        def linear(dst, w, shape):                 # a pk_linear with kernels.matmul's mode for one row
            kind = _kind(w)
            if kind not in _C_KINDS or tuple(map(int, w.shape)) != shape:
                raise LookupError
            path, act = plan(kind, 1)
            if path != "c":
                raise LookupError
            r = c.linear_record(kind, act, shape, *_owned(w, kind))
            self.keep.append(r)
            dst.fmt, dst.act, dst.n_out, dst.n_in, dst.w, dst.scales = (r[0].fmt, r[0].act, r[0].n_out, r[0].n_in,
                                                                        r[0].w, r[0].scales)

        from ..attention import _inv_freq
        L.in_ln, L.post_ln = vec(lw.input_layernorm, D), vec(lw.post_attention_layernorm, D)
        L.kv_ln = vec(a.kv_a_layernorm, R)
        L.inv_freq = vec(_inv_freq(dr, float(cfg.rope_theta)), dr // 2)
        dq = H * (dn + dr)
        if L.q_lora:
            if a.q_a_proj is None or a.q_b_proj is None or a.q_a_layernorm is None:
                raise LookupError
            L.q_ln = vec(a.q_a_layernorm, L.q_lora)
            linear(L.q_a, a.q_a_proj, (L.q_lora, D))
            linear(L.q, a.q_b_proj, (dq, L.q_lora))
        else:
            if a.q_proj is None:
                raise LookupError
            linear(L.q, a.q_proj, (dq, D))
        linear(L.kv_a, a.kv_a_proj_with_mqa, (R + dr, D))
        linear(L.o, a.o_proj, (D, H * dv))
        kind = _kind(a.kv_b_proj)
        if kind not in _C_KINDS or tuple(map(int, a.kv_b_proj.shape)) != (H * (dn + dv), R):
            raise LookupError
        f = c.FMT[kind]
        b = c._weight_buffers(f, *_owned(a.kv_b_proj, kind))
        self.keep.append(b)
        L.kvb_fmt, L.kvb_act, L.kvb, L.kvb_scales = f, c.ACT[_act_mode(kind)], b[2], b[3]
        if lw.is_moe:
            L.moe = 1
            rule = lw.router if lw.router is not None else _checks()[5](cfg)
            if rule.scoring not in ("sigmoid", "softmax") or len(lw.gate_w.shape) != 2:
                raise LookupError
            E = self.E = L.E = int(lw.gate_w.shape[0])
            self.k = int(rule.k)
            if (int(lw.gate_w.shape[1]) != D or not 0 < rule.k <= E or E % max(rule.n_group, 1)
                    or E != int(cfg.n_routed_experts)):
                raise LookupError
            grec = _gate_record(lw.gate_w)
            if grec is None:
                raise LookupError
            self.rule, self.grec = rule, grec
            L.gate = grec[0][0]
            if rule.use_bias:
                if lw.gate_bias is None:
                    raise LookupError           # the definition raises its one-line error
                L.bias = vec(lw.gate_bias, E)
                self.bias = self.keep[-1]
            else:
                self.bias = None
                L.bias = c.ffi.NULL               # the bias is for noaux_tc's selection only
            (L.k, L.n_group, L.topk_group, L.group_top2, L.norm, L.scaling, L.sigmoid) = _rule_args(rule)
            self.table = None
        else:
            L.moe = 0
            recs = _c_experts([tuple(lw.mlp)], [1.0], D)
            if recs is None:
                raise LookupError
            self.keep.append(recs)
            L.mlp = recs[0][0][0]

    def fits(self, lw, setting) -> bool:
        a = lw.attn
        w = self.weights
        return (setting == self.setting and w[0] is lw.input_layernorm and w[1] is lw.post_attention_layernorm
                and w[4] is a.q_proj and w[6] is a.q_b_proj and w[7] is a.kv_a_proj_with_mqa and w[8] is a.kv_b_proj
                and w[9] is a.o_proj and w[10] is lw.mlp and w[11] is lw.gate_w and w[12] is lw.gate_bias
                and w[13] is lw.shared and w[2] is a.kv_a_layernorm and w[3] is a.q_a_layernorm
                and w[5] is a.q_a_proj)

    def use_table(self, tab) -> None:
        """Point the record at the layer's current table of expert records."""
        L = self.rec
        L.table, L.n_shared = tab.arr, tab.n_shared
        L.shared = tab.shared if tab.shared is not None else _mods["c"].ffi.NULL
        self.table = tab


def _layer_record(lw, cfg):
    """The layer's kept _LayerRecord (made or remade when it does not fit), or None when C cannot run it."""
    setting = act_quant()
    got = getattr(lw, "_c_layer", None)
    if got is None or not got.fits(lw, setting):
        if lw.attn.kv_b_f32 is not None:
            return None                              # an f32 kv_b copy: the definition's NumPy products
        try:
            got = _LayerRecord(lw, cfg, setting)
        except LookupError:
            return None
        lw._c_layer = got
    if got.E:
        tab = _expert_table(lw.get_expert, lw.shared, got.E, got.D)   # follows the read generation
        if tab is None:
            return None
        if tab is not got.table:
            got.use_table(tab)
    return got


@twin_of("pykimi.model.decode_layer")
def decode_layer(definition, x, lw, cache, pos: int, cfg):
    """One decode token through one decoder layer in ONE C call with the C backend (pk_decode_layer over the
    layer's record, made once): bit for bit the definition's stages on the C kernels. The cache row is taken
    with cache.next_row (the buffer may have been reallocated since the last token: its pointer is passed per
    call) and committed after. An expert chosen for the first time is resolved between the call and a pk_moe
    on the layer's normalised h (the call returns 1 then). Otherwise the definition."""
    if backend() == "c" and x.dtype == np.float32 and x.shape == (1, cfg.hidden_size) and x.flags.c_contiguous:
        rec = _layer_record(lw, cfg)
        if rec is not None:
            rows, n = cache.next_row(lw.layer)
            if (rows.dtype in (np.float32, np.uint16) and rows.flags.c_contiguous
                    and rows.shape[1] == rec.rec.R + rec.rec.dr):
                out = _layer_call(rec, x, int(pos), rows, n, lw)
                cache.commit(lw.layer)
                return out
    return definition(x, lw, cache, pos, cfg)


def _layer_call(rec, x, pos: int, rows, n: int, lw):
    c = _mods["c"]
    fb = c.ffi.from_buffer
    D, E, k = rec.D, rec.E, rec.k
    buf = np.empty(2 * D + 2 * E + k + 1, np.float32)   # xo | h | logits | scores | weights | margin
    ids = np.empty(max(k, 1), np.int32)
    bp = c.ffi.cast("float *", fb("float[]", buf))
    h = bp + D
    rc = c.lib.pk_decode_layer(rec.rec, fb("float[]", x), pos, fb("char[]", rows), c.cache_dtype_code(rows), n,
                               bp, h, h + D, h + D + E,
                               fb("int[]", ids), h + D + 2 * E, h + D + 2 * E + k)
    xo = buf[None, :D]
    if rc == 0:
        return xo
    if rc != 1:
        raise (MemoryError if rc == -1 else ValueError)(f"pk_decode_layer failed ({rc})")
    # an expert chosen for the first time: the router and experts again on h over the table, resolving the
    # new experts in between (pk_moe's contract; the selection is recomputed the same); the residual add as
    # the definition's x + m
    h = buf[None, D:2 * D]
    got = _moe_call(h, rec.grec, rec.bias, rec.rule, rec.table, lw.get_expert)
    if got is None:                                # an expert C does not read: the definition's FFN on h
        from ..moe import moe_decode as definition
        got = definition(h, lw.gate_w, lw.gate_bias, rec.rule, lw.get_expert, lw.shared, n_experts=E)
    return xo + got[0]


@twin_of("pykimi.model.decode_layers")
def decode_layers(definition, x, lws, cache, pos: int, cfg):
    """One decode token through the whole stack in ONE C call with the C backend (pk_decode_layers over the
    layers' kept records): bit for bit decode_layer after decode_layer. Every layer's cache row is taken with
    cache.next_row (pointers passed per call: a buffer may have been reallocated) and committed once written.
    A layer that meets an expert chosen for the first time stops the call (return 1): its FFN is finished here
    (the experts resolved, then pk_moe on its h, as the one-layer twin does) and the call goes on from the next
    layer. Otherwise (a layer C cannot run, another backend) each layer through fast(decode_layer)."""
    n_l = len(lws)
    if backend() == "c" and n_l and x.dtype == np.float32 and x.shape == (1, cfg.hidden_size) and x.flags.c_contiguous:
        recs = []
        for lw in lws:
            r = _layer_record(lw, cfg)
            if r is None:
                break
            recs.append(r)
        else:
            got = _stack_call(recs, x, int(pos), cache, lws)
            if got is not None:
                return got
    one = fast(_checks_model().decode_layer)
    for lw in lws:
        x = one(x, lw, cache, pos, cfg)
    return x


def _checks_model():
    from .. import model
    return model


def _stack_call(recs, x, pos: int, cache, lws):
    c = _mods["c"]
    ffi, fb = c.ffi, c.ffi.from_buffer
    n_l, D = len(recs), recs[0].D
    E = max(r.E for r in recs)
    k = max(r.k for r in recs)
    bufs, ns = [], np.empty(n_l, np.int64)
    bufs_dtype = None
    R = recs[0].rec.R + recs[0].rec.dr
    for i, lw in enumerate(lws):
        rows, n = cache.next_row(lw.layer)
        if (rows.dtype != bufs_dtype if bufs else rows.dtype not in (np.float32, np.uint16)) \
                or not rows.flags.c_contiguous or rows.shape[1] != R or recs[i].D != D:
            return None
        bufs.append(rows)
        bufs_dtype = rows.dtype                            # one dtype for the stack (one cdt per call)
        ns[i] = n
    lp = ffi.new("pk_layer *[]", [r.rec for r in recs])
    rp = ffi.new("void *[]", [ffi.cast("void *", fb("char[]", b)) for b in bufs])
    cdt = c.cache_dtype_code(bufs[0])
    buf = np.empty(2 * D + 2 * E + k + 1, np.float32)   # xo | h | logits | scores | weights | margin
    ids = np.empty(max(k, 1), np.int32)
    done = ffi.new("int *")
    bp = ffi.cast("float *", fb("float[]", buf))
    h = bp + D
    idp = fb("int[]", ids)
    xo = buf[None, :D]
    src = fb("float[]", x)
    start = 0
    while True:
        rc = c.lib.pk_decode_layers(n_l - start, lp + start, src, pos, rp + start, cdt, fb("int64_t[]", ns) + start,
                                    bp, h, h + D, h + D + E, idp, h + D + 2 * E, h + D + 2 * E + k, done)
        end = start + done[0]
        if rc == 0:
            for lw in lws[start:]:
                cache.commit(lw.layer)
            return xo
        if rc != 1:
            raise (MemoryError if rc == -1 else ValueError)(f"pk_decode_layers failed ({rc}) at layer {lws[end].layer}")
        # layer `end` met an expert chosen for the first time: finish its FFN as the one-layer twin does
        rec, lw = recs[end], lws[end]
        hv = buf[None, D:2 * D].copy()
        got = _moe_call(hv, rec.grec, rec.bias, rec.rule, rec.table, lw.get_expert)
        if got is None:
            from ..moe import moe_decode as moe_definition
            got = moe_definition(hv, lw.gate_w, lw.gate_bias, rec.rule, lw.get_expert, lw.shared, n_experts=rec.E)
        xo[...] = xo + got[0]
        for lw_done in lws[start:end + 1]:
            cache.commit(lw_done.layer)
        start = end + 1
        if start == n_l:
            return xo
        src = bp
