"""The serving engine: sequences, one scheduler thread that owns the model, and the batched decode step.

    eng = Engine(model, parallel=4)            # one scheduler thread owns the model
    req = eng.submit(input_ids, pixel_values, image_grid_hws, params=SamplingParams(max_new_tokens=64))
    for ev in req: ...                         # Event(token_id, logprob, top_logprobs, finish_reason)
    res = req.result()                         # Result(ids, finish_reason, prompt_tokens, completion_tokens, timings)

Continuous batching (issue 20). CPU decode is bound by reading weights, so the scheduler advances every running
sequence (up to ``parallel``) in ONE forward per step (:func:`decode_batch`): attention per sequence against its
own latent cache (the fused C attention of a single decode, for all sequences in one call); the projections,
o_proj, dense layers, router and lm_head as products on the [B, D] batch; routed and shared experts grouped
across the batch (``pk_swiglu_batch``) so that each chosen expert's weights are read once per step. New requests
join between steps; a prompt is prefilled one chunk per scheduler iteration, between decode steps, so running
streams keep flowing.

The step's Python between the kernels is kept small (~1.5 ms a step of 27 layers at B = 4, from ~8): the C
arguments of a layer are made once and kept (:class:`_BatchLayer`, on the single step's own pk_layer record), a step
allocates its buffers once, and puts every call's arguments together before the first layer (_layers_batched);
weights, caches or experts those records do not take run the stage-by-stage loop (_layers_generic), the same
kernels with the same results.

Batching changes nothing: every product of the batched step runs kernels whose result for one row of x does not
depend on the other rows (the C per-row kernels at any n, ``kernels.matmul_many(rowwise=True)``; the router is
``pk_route``, each row's GEMV alone, the arithmetic of a single step's ``pk_moe``), and the MoE kernel is bit for
bit ``pk_swiglu_sum`` per row; so a batched step's logits for a sequence are bit-identical to
``model.decode_step`` on that sequence alone, and a request's greedy tokens are the same alone or beside others
(tests/test_engine.py holds it on the demo and the tiny golden checkpoint, bf16 and quantised). When the fast
path does not apply (not the C backend, a trace active, an f32 kv_b copy) the step falls back to
``model.decode_step`` per sequence: slower, the same numbers.

One thread owns the model: the scheduler runs every prefill, vision and decode call, so the C kernels' OpenMP
threads form one team. A second thread that calls the kernels (e.g. the model used directly while an engine
runs) keeps a second team alive, and with more OpenMP threads than cores libgomp cuts its spinning to ~1 %: every
parallel region then waits for sleeping workers (27 layers int4, one stream on 2 cores: 45 instead of 38 ms a step).

Reuse: image features are cached by pixel content (bounded bytes); a finished sequence's latent cache is kept
(bounded by the cache budget) and a new prompt that extends that conversation (starts with its whole prompt)
reuses the rows it shares. Memory: every sequence's cache is allocated up front for prompt + max_new_tokens;
admission waits while the sum would pass ``cache_budget_mb`` (kept prefixes are dropped first) and
:class:`QueueFull` is raised when ``max_queue`` requests already wait.
"""
from __future__ import annotations

import collections
import gc
import hashlib
import itertools
import operator
import queue
import threading
import time
import weakref
from dataclasses import dataclass, field

import numpy as np

from . import kernels
from .attention import mla_absorbed
from .cache import cache_dtype_name
from .errors import InputError, NumericsError, PykimiError
from .generate import apply_repetition_penalty, default_stop_ids, pick_token
from .kernels import linear as _linear, probe as _probe
from .model import LM, embed_and_merge, embed_rows, final_norm
from .moe import route, router_rule, swiglu_sum
from .ops import add_rms_norm, rms_norm
from .trace import active as trace_active


class QueueFull(PykimiError):
    """The engine's wait queue is full (the server answers 503 with Retry-After)."""


class EngineStopped(PykimiError):
    """The engine was stopped before the request finished."""


# ---------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------
@dataclass
class SamplingParams:
    """How one request picks its tokens (the order of generate.py: penalties -> bias -> temperature -> top-k
    -> top-p -> min-p). temperature 0 is greedy. stop_ids None: the model's [EOS] and <|im_end|>."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_ids: tuple | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    logprobs: int = 0               # 0: none; n >= 1: the chosen token's logprob and the n most likely

    def check(self, vocab_size: int) -> "SamplingParams":
        def num(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
                raise InputError(f"{name}={v!r}: expected a number")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise InputError(f"{name}={v!r}: expected {'>' if lo_open else '>='} {lo}")
            if hi is not None and v > hi:
                raise InputError(f"{name}={v!r}: expected <= {hi}")

        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise InputError(f"{name}={v!r}: expected an integer >= {lo}")

        integer("max_new_tokens", 1)
        num("temperature", 0.0, 100.0)
        num("top_p", 0.0, 1.0, lo_open=True)
        integer("top_k", 0)
        num("min_p", 0.0, 1.0)
        num("repetition_penalty", 0.0, lo_open=True)
        num("presence_penalty", -2.0, 2.0)
        num("frequency_penalty", -2.0, 2.0)
        integer("logprobs", 0)
        if self.logprobs > 20:
            raise InputError(f"logprobs={self.logprobs}: expected at most 20")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InputError(f"seed={self.seed!r}: expected a non-negative integer")
        if self.stop_ids is not None:
            for s in self.stop_ids:
                if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < vocab_size:
                    raise InputError(f"stop_ids: {s!r} is not a token id in [0, {vocab_size})")
        if self.logit_bias:
            if not isinstance(self.logit_bias, dict):
                raise InputError("logit_bias: expected a mapping from token id to a bias in [-100, 100]")
            for k, v in self.logit_bias.items():
                try:
                    t = int(k)
                except (TypeError, ValueError):
                    raise InputError(f"logit_bias: key {k!r} is not a token id") from None
                if not 0 <= t < vocab_size:
                    raise InputError(f"logit_bias: token id {t} is outside the vocabulary [0, {vocab_size})")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise InputError(f"logit_bias[{k}]={v!r}: expected a number in [-100, 100]")
        return self


@dataclass
class Event:
    """One generated token (finish_reason None until the last event; a final event without a token, token_id
    None, ends a cancelled request)."""
    token_id: int | None
    logprob: float | None = None
    top_logprobs: list | None = None          # [(token_id, logprob)] most likely first
    finish_reason: str | None = None          # "stop" | "length" | "cancelled"


@dataclass
class Result:
    ids: list
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict = field(default_factory=dict)


class Request:
    """A submitted request: iterate for its events as they come, cancel() to free it, result() to wait."""

    def __init__(self, rid: int, prompt_tokens: int):
        self.id = rid
        self.prompt_tokens = prompt_tokens
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._result: Result | None = None
        self._error: BaseException | None = None
        self._listeners: list = []
        self._sub = threading.Lock()
        self.ids: list[int] = []

    def __iter__(self):
        while True:
            ev = self._events.get()
            if isinstance(ev, BaseException):
                raise ev
            yield ev
            if ev.finish_reason is not None:
                return

    def events(self, timeout: float | None = None):
        """Like iteration, but raise TimeoutError when no event comes for ``timeout`` seconds."""
        while True:
            try:
                ev = self._events.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"request {self.id}: no event for {timeout} s") from None
            if isinstance(ev, BaseException):
                raise ev
            yield ev
            if ev.finish_reason is not None:
                return

    def cancel(self) -> None:
        """Ask the scheduler to drop this request; it is freed at the next step boundary."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Result:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def subscribe(self, fn) -> None:
        """Deliver every event (and a final exception, if any) to ``fn`` instead of the iterator, from the
        scheduler thread; events already queued are handed over first. For an asyncio server:
        ``req.subscribe(lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))``."""
        with self._sub:
            while True:
                try:
                    fn(self._events.get_nowait())
                except queue.Empty:
                    break
            self._listeners.append(fn)

    # scheduler side
    def _put(self, item) -> None:
        with self._sub:
            if self._listeners:
                for fn in self._listeners:
                    fn(item)
            else:
                self._events.put(item)

    def _emit(self, ev: Event) -> None:
        if ev.token_id is not None:
            self.ids.append(ev.token_id)
        self._put(ev)

    def _finish(self, result: Result | None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        if error is not None:
            self._put(error)
        self._done.set()


def call_in_own_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs) in a new thread that ends when fn returns (its result returned, its exception raised).
    For model calls made beside a running engine from a thread that lives on (a web server's worker pool): that
    thread's OpenMP team of the C kernels ends with it, so the engine's team is again the only one (see the
    module docstring: a second team left alive throttles libgomp's spinning for every step after)."""
    out: dict = {}

    def body():
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 -- handed back to the caller
            out["error"] = e
    t = threading.Thread(target=body, name="pykimi-call", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


# ---------------------------------------------------------------------------------------------------------
# The batched decode step
# ---------------------------------------------------------------------------------------------------------
def _kind(w) -> str:
    """kernels' name for a weight's stored form: "dense" for an ndarray, else weights.KINDS."""
    return "dense" if isinstance(w, np.ndarray) else str(getattr(w, "kind", ""))


def rowwise_products(xs, ws) -> list:
    """[x @ W.T for x, w] where each row of each result equals the product of that row alone (the per-row
    kernels at any n, kernels.matmul_many(rowwise=True)), all in one call: one read of each weight."""
    return kernels.matmul_many(xs, ws, rowwise=True)


def _swiglu_batch(h: np.ndarray, experts: list, sel: np.ndarray, coefs: np.ndarray) -> np.ndarray | None:
    """out[b] = kernels.swiglu_sum(h[b], [experts[e] for e in sel[b]], coefs[b]) for every row, each expert's
    weights read once (pk_swiglu_batch); sel int [B, k], coefs f32 [B, k]; None when the C kernel cannot take
    these weights."""
    c = _probe._mods.get("c") if kernels.backend() == "c" else None
    lib = getattr(c, "lib", None)
    if lib is None or not hasattr(lib, "pk_swiglu_batch"):
        return None
    B, d = h.shape
    recs = kernels.fused._c_experts(experts, [1.0] * len(experts), d)
    if recs is None:
        return None
    kmax = sel.shape[1]
    sel_a = np.ascontiguousarray(sel, dtype=np.int32)
    coef_a = np.ascontiguousarray(coefs, dtype=np.float32)
    nsel = np.full(B, kmax, dtype=np.int32)
    x = np.ascontiguousarray(h, dtype=np.float32)
    out = np.empty((B, d), dtype=np.float32)
    arr = c.ffi.new("pk_expert[]", [r[0][0] for r in recs])
    p = c.ffi.from_buffer
    rc = lib.pk_swiglu_batch(len(recs), arr, p("float[]", x), B, d, kmax, p("int[]", nsel), p("int[]", sel_a),
                             p("float[]", coef_a), p("float[]", out))
    if rc != 0:
        raise MemoryError(f"pk_swiglu_batch failed ({rc})")
    return out


def _moe_batch(h: np.ndarray, experts: list, sel: np.ndarray, coefs: np.ndarray) -> np.ndarray:
    """_swiglu_batch, or per row the single step's fused swiglu_sum when the C kernel cannot take the weights."""
    m = _swiglu_batch(h, experts, sel, coefs)
    if m is None:
        m = np.stack([kernels.fast(swiglu_sum)(h[b], [experts[e] for e in sel[b]], [float(v) for v in coefs[b]])
                      for b in range(h.shape[0])])
    return m


def _mla_batch(q, kva, a, t, inv_freq, caches, layer: int, scale: float, dims):
    """kernels.mla_absorbed for every sequence b (its own cache, position len(cache)) in one C call
    (pk_mla_absorbed_batch: one parallel region, bit for bit the single calls) -> o f32[B, H*dv]; writes and
    commits each cache's new row. None when the C kernel is not there."""
    c = _probe._mods.get("c") if kernels.backend() == "c" else None
    lib = getattr(c, "lib", None)
    if lib is None or not hasattr(lib, "pk_mla_absorbed_batch"):
        return None
    kind = _kind(a.kv_b_proj)
    if kind not in c.FMT:
        return None
    H, dn, dr, dv, R = dims
    B = len(caches)
    bufs, ns = [], []
    for cache in caches:
        rows, n = cache.next_row(layer)
        if bufs and rows.dtype != bufs[0].dtype:
            return None                                 # one cdt per call (an engine's caches share one dtype)
        try:
            c.cache_dtype_code(rows)
        except ValueError:
            return None
        bufs.append(rows)
        ns.append(n)
    wdata, scales, wp, sp = c._weight_buffers(c.FMT[kind], *_linear._stored(a.kv_b_proj, kind), a.kv_b_proj)
    q = np.ascontiguousarray(q, dtype=np.float32)
    kva = np.ascontiguousarray(kva, dtype=np.float32)
    ln = np.ascontiguousarray(a.kv_a_layernorm, dtype=np.float32)
    freq = np.ascontiguousarray(inv_freq, dtype=np.float32)
    n_a = np.asarray(ns, dtype=np.int64)
    out = np.empty((B, H * dv), dtype=np.float32)
    p = c.ffi.from_buffer
    rc = lib.pk_mla_absorbed_batch(B, H, dn, dr, dv, R, p("float[]", q), p("float[]", kva), p("float[]", ln),
                                   float(t.kv_a_layernorm_eps), p("float[]", freq), p("int64_t[]", n_a),
                                   [c.ffi.cast("void *", p("char[]", r)) for r in bufs],
                                   c.cache_dtype_code(bufs[0]) if bufs else 0, p("int64_t[]", n_a),
                                   c.FMT[kind], c.ACT[_linear._act_mode(kind)], wp, sp, float(scale),
                                   p("float[]", out))
    if rc != 0:
        raise (MemoryError if rc == -1 else ValueError)(f"pk_mla_absorbed_batch failed ({rc})")
    for cache in caches:
        cache.commit(layer)
    return out


def batched_available(model) -> bool:
    """Whether :func:`decode_batch` takes the batched path (else it runs model.decode_step per sequence)."""
    return kernels.backend() == "c" and not trace_active() and not model.text.q_lora_rank


def freeze_heap() -> int:
    """Collect, then move every object alive now into the cyclic collector's permanent generation (gc.freeze);
    returns how many there are. For a long-running server, once the model is loaded and warmed up.

    Why: a loaded, warmed model holds ~166k tracked objects (weight records, their memoryviews and cffi
    buffers, compiled kernels), and a full collection walks all of them. With the 27-layer int4 checkpoint
    that took 47-62 ms (AMD EPYC Zen 5). Python starts one by itself now and then; in one run of 128 decode
    steps, the step that ran into it took 81 ms against a median of 33 (in a batched step, every sequence
    waits). After the freeze a full collection takes under 0.01 ms. Objects that are frozen and later become
    cyclic garbage are never reclaimed (gc.unfreeze undoes it), so this belongs to a process that keeps its
    model for life -- ``pykimi serve`` calls it after its warm-up request -- not to a library call."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def decode_batch(model, token_ids, caches, stats: dict | None = None, single_fused: bool = True) -> np.ndarray:
    """One decode step for B sequences: token_ids[b] at position len(caches[b])   -> logits f32[B, V].

    Row b is bit-identical to ``model.decode_step(token_ids[b], caches[b])``. ``stats`` (optional) receives
    the step's weight reads: bytes of every distinct weight touched ("bytes_read") and of the routed experts
    chosen ("expert_bytes"), and the number of distinct experts per layer. single_fused: one sequence runs
    ``model.decode_step`` itself (False: the batched path, for tests)."""
    B = len(token_ids)
    for c in caches:
        model.check_length(len(c) + 1)
    if B == 0:
        return np.zeros((0, model.text.vocab_size), np.float32)
    lw0 = model.layer_weights(0)
    if not batched_available(model) or lw0.attn.kv_b_f32 is not None:
        return np.stack([model.decode_step(int(t), c) for t, c in zip(token_ids, caches)])
    if B == 1 and single_fused:
        # one sequence: the single step itself (the whole layer stack in one C call, ~12 % faster than the
        # batched path's per-layer calls on 27 layers), which the batched path equals bit for bit anyway; what
        # it reads is known without its routing (top-k distinct experts a layer, all of one size)
        if stats is not None:
            for k, v in _single_step_reads(model).items():
                stats[k] = stats.get(k, 0) + v if k != "experts_per_layer" else v
        return model.decode_step(int(token_ids[0]), caches[0])[None]
    t = model.text
    x = embed_rows(model.embed_table(), np.asarray(token_ids, dtype=np.int64))          # [B, D]
    plan = _batch_plan(model, caches)
    if plan is not None:
        x, nbytes, n_experts = _layers_batched(*plan, t, x, caches, stats)
    else:
        x, nbytes, n_experts = _layers_generic(model, x, caches, stats)
    hn = final_norm(x, model._kept(f"{LM}.norm.weight", lambda: model.ckpt.f32(f"{LM}.norm.weight")),
                    t.rms_norm_eps)
    name = "language_model.lm_head.weight"
    head = model._kept(name, lambda: model.ckpt.weight(name))
    logits = rowwise_products([hn], [head])[0]                                         # [B, V]
    if stats is not None:
        stats["bytes_read"] = stats.get("bytes_read", 0) + nbytes + _nbytes(head)
        stats["experts_per_layer"] = n_experts
    return logits


def _layers_generic(model, x, caches, stats):
    """The decoder layers of decode_batch, stage by stage (the kernels' Python wrappers): the path for weights or
    caches that _batch_plan does not take -> (x [B, D] after the last layer, bytes read, experts per layer)."""
    t = model.text
    B = len(caches)
    H, dn, dr, dv, R = t.num_attention_heads, t.qk_nope_head_dim, t.qk_rope_head_dim, t.v_head_dim, t.kv_lora_rank
    from .attention import _inv_freq
    inv_freq = _inv_freq(dr, float(t.rope_theta))
    scale = t.qk_head_dim ** -0.5
    nbytes = 0
    n_experts = []
    for layer in range(t.num_hidden_layers):
        lw = model.layer_weights(layer)
        h = kernels.fast(rms_norm)(x, lw.input_layernorm, t.rms_norm_eps)                      # [B, D]
        # -- attention: projections as [B, D] products, the absorbed attention per sequence (its own cache)
        a = lw.attn
        q, kva = rowwise_products([h, h], [a.q_proj, a.kv_a_proj_with_mqa])            # [B, H*(dn+dr)], [B, R+dr]
        o = _mla_batch(q, kva, a, t, inv_freq, caches, layer, scale, (H, dn, dr, dv, R))
        if o is None:                                   # one fused call per sequence (the same arithmetic)
            o = np.empty((B, H * dv), dtype=np.float32)
            for b, cache in enumerate(caches):
                rows, n = cache.next_row(layer)
                o[b] = kernels.fast(mla_absorbed)(q[b], kva[b], a.kv_a_layernorm, t.kv_a_layernorm_eps, inv_freq, n,
                                            rows, n, a.kv_b_proj, scale, (H, dn, dr, dv, R))
                cache.commit(layer)
        att = rowwise_products([o], [a.o_proj])[0]                                       # [B, D]
        x, h = kernels.fast(add_rms_norm)(x, att, lw.post_attention_layernorm, t.rms_norm_eps)
        if stats is not None:
            nbytes += sum(_nbytes(w) for w in (a.q_proj, a.kv_a_proj_with_mqa, a.o_proj, a.kv_b_proj))
        # -- FFN
        m, nb = _ffn_generic(lw, t, h, stats, n_experts)
        nbytes += nb
        x = x + m
    return x, nbytes, n_experts


def _ffn_generic(lw, t, h, stats, n_experts):
    """One layer's FFN on normalised h [B, D] through _moe_batch -> (m [B, D], bytes read besides the routed
    experts'); the routed experts' bytes go to stats["expert_bytes"], their count to n_experts."""
    B = h.shape[0]
    nbytes = 0
    if not lw.is_moe:
        # the single step's dense FFN is a one-expert swiglu_sum of weight 1 (model.ffn): the same call per
        # row (pk_swiglu_batch, bit for bit pk_swiglu_sum of the row), so silu rounds the same
        m = _moe_batch(h, [tuple(lw.mlp)], np.zeros((B, 1), np.int32), np.ones((B, 1), np.float32))
        if stats is not None:
            nbytes += sum(_nbytes(w) for w in lw.mlp)
        return m, nbytes
    rule = lw.router if getattr(lw, "router", None) is not None else router_rule(t)
    # the single decode step's router (pk_route: each row's logits a GEMV of that row alone, the same
    # selection as its pk_moe), so a row's experts and weights are bit for bit decode_step's
    rec = kernels.fast(route)(h, lw.gate_w, lw.gate_bias, rule)                     # [B, k] each
    # per row: routed experts in ascending id order, as moe_forward's one-token path; sel indexes the
    # step's distinct experts (chosen, ascending), each read once for all rows
    ids = np.asarray(rec.topk_ids)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    chosen = np.unique(ids)
    sel = np.searchsorted(chosen, ids).astype(np.int32)                            # [B, k]
    coefs = np.take_along_axis(np.asarray(rec.topk_weights, dtype=np.float32), order, axis=1)
    experts = [tuple(lw.get_expert(int(e))) for e in chosen]
    if lw.shared is not None:                                # the shared experts last, weight 1
        experts.append(tuple(lw.shared))
        sel = np.concatenate([sel, np.full((B, 1), len(experts) - 1, np.int32)], axis=1)
        coefs = np.concatenate([coefs, np.ones((B, 1), np.float32)], axis=1)
    m = _moe_batch(h, experts, sel, coefs)
    if stats is not None:
        eb = sum(_nbytes(w) for e in experts[:len(chosen)] for w in e)
        stats["expert_bytes"] = stats.get("expert_bytes", 0) + eb
        nbytes += eb + (sum(_nbytes(w) for w in lw.shared) if lw.shared is not None else 0)
        nbytes += _nbytes(lw.gate_w)
        n_experts.append(len(chosen))
    return m, nbytes


# The batched step's layers with their C arguments made once. The stage-by-stage loop above rebuilt, every layer
# of every step, what does not change between steps -- each weight's kind, plan and pointers, the norms' contiguous
# copies, the experts' C records and their array, ~800 cffi pointers a step -- and came back to NumPy a dozen
# times a layer for the routing's bookkeeping: ~7 ms a step of 27 layers at B = 4, against ~0.5 ms for the
# single step's fused call. Below, a layer is seven C calls whose arguments come from the layer's pk_layer record
# (kernels/fused.py _LayerRecord, the single step's own, made once and kept on the LayerWeights: the same weight
# pointers, activation modes, norms, inv_freq and router), the buffers of a step are allocated once for all
# layers, and the experts go to pk_swiglu_batch as the layer's whole table (records of the experts chosen so far,
# the shared experts last), so the selection is the router's ids as they come. Same kernels, same arguments,
# same order of the sums: bit for bit the stage-by-stage loop.
class _BatchLayer:
    """What a layer's batched step hands to C besides the step's buffers, made once from its _LayerRecord (and
    kept on it, so a remade record -- other weight objects, another activation setting -- makes a new one):
    the q / kv_a and o_proj jobs of pk_matmul_many on the per-row kernels (their one-row plan, c.ROWS), the
    router's arguments, the dense MLP's record, and the bytes a step reads of the layer's weights besides the
    routed experts. The routed experts: ``full``, a pk_expert array of the E routed experts (NULL records for
    those not chosen yet) and the shared experts at E, filled from the layer's table of expert records
    (fused._expert_table, shared with the single step) as rows choose them; it follows that table, which a new
    read generation (read_counter.clear()) or activation setting replaces -- so an expert is resolved (read,
    counted) the first time a token chooses it after a clear, as the single step and the stage-by-stage loop do."""

    def __init__(self, rec, lw, c):
        ffi = c.ffi
        L = rec.rec
        a = lw.attn
        self.D, self.dq, self.dkv, self.do = int(L.D), int(L.H * (L.dn + L.dr)), int(L.R + L.dr), int(L.H * L.dv)
        rows = c.ROWS
        # pk_matmul_many's arguments before and after (xs, ns), and after ys, the step's buffers
        self.qkv_head = (2, ffi.new("int[]", [L.q.fmt, L.kv_a.fmt]),
                         ffi.new("int[]", [L.q.act | rows, L.kv_a.act | rows]))
        self.qkv_tail = (ffi.new("int64_t[]", [L.q.n_in, L.kv_a.n_in]), ffi.new("void *[]", [L.q.w, L.kv_a.w]),
                         ffi.new("float *[]", [L.q.scales, L.kv_a.scales]),
                         ffi.new("int64_t[]", [L.q.n_out, L.kv_a.n_out]))
        self.o_head = (1, ffi.new("int[]", [L.o.fmt]), ffi.new("int[]", [L.o.act | rows]))
        self.o_tail = (ffi.new("int64_t[]", [L.o.n_in]), ffi.new("void *[]", [L.o.w]),
                       ffi.new("float *[]", [L.o.scales]), ffi.new("int64_t[]", [L.o.n_out]))
        self.mla = (L.H, L.dn, L.dr, L.dv, L.R)
        self.kv = (L.kv_ln, L.kv_eps, L.inv_freq)
        self.kvb = (L.kvb_fmt, L.kvb_act, L.kvb, L.kvb_scales, L.scale)
        self.eps, self.in_ln, self.post_ln = L.eps, L.in_ln, L.post_ln
        self.E = self.k = 0
        self.tab = None
        if rec.E:
            from .kernels.fused import _rule_args
            self.E, self.k = rec.E, rec.k
            self.route = (rec.grec[0], L.bias if rec.bias is not None else ffi.NULL, rec.E) + _rule_args(rec.rule)
            self.ffn_nbytes = _nbytes(lw.gate_w) + (sum(_nbytes(w) for w in lw.shared) if lw.shared is not None
                                                    else 0)
        else:
            self.mlp = ffi.addressof(L, "mlp")
            self.ffn_nbytes = sum(_nbytes(w) for w in lw.mlp)
        self.nbytes = self.ffn_nbytes + sum(_nbytes(w) for w in (a.q_proj, a.kv_a_proj_with_mqa, a.o_proj,
                                                                   a.kv_b_proj))

    def use_table(self, tab, c) -> None:
        """Start over from the layer's (new) table of expert records."""
        self.tab = tab
        self.n_shared = int(tab.n_shared)
        self.full = c.ffi.new("pk_expert[]", self.E + self.n_shared)
        if self.n_shared:
            self.full[self.E] = tab.shared[0]
        self.have: set = set()                                # routed records copied into full
        self.ebytes = [0] * self.E                            # their weights' bytes

    def add(self, e: int, lw, c) -> bool:
        """Copy routed expert e's record into full, resolving it in the table first if nobody chose it since the
        table was made; False when C cannot read its weights."""
        tab = self.tab
        if tab.arr[e].g == c.ffi.NULL and not tab.fill(e, lw.get_expert):
            return False
        self.full[e] = tab.arr[e]
        self.have.add(e)
        self.ebytes[e] = sum(_nbytes(w) for w in lw.get_expert(e))   # resolved above: kept, not read again
        return True


def _batch_plan(model, caches):
    """([(lw, _BatchLayer, _LayerRecord)] for every layer, the caches' rows) for _layers_batched, or None when the
    step must take the stage-by-stage loop (a layer or expert form the fused records do not take, caches of mixed
    or unknown dtypes). The rows: (pointers [L, B] of every layer's cache buffer, rows held [L, B], cdt), room made for the
    new row in every layer (LatentCache.next_rows)."""
    c = _probe._mods.get("c")
    lib = getattr(c, "lib", None)
    if lib is None or not hasattr(lib, "pk_swiglu_batch") or not hasattr(lib, "pk_mla_absorbed_batch"):
        return None
    from .kernels.fused import _layer_record
    t = model.text
    L = t.num_hidden_layers
    plan = []
    for layer in range(L):
        lw = model.layer_weights(layer)
        rec = _layer_record(lw, t)
        if rec is None or (rec.E and rec.table is None):
            return None
        bl = getattr(rec, "_batch", None)
        if bl is None:
            bl = rec._batch = _BatchLayer(rec, lw, c)
        if bl.E and bl.tab is not rec.table:
            bl.use_table(rec.table, c)
        plan.append((lw, bl, rec))                     # rec: what bl's pointers point into, held for the step
    rows = _cache_rows(caches, L, int(t.kv_lora_rank) + int(t.qk_rope_head_dim), c)
    return None if rows is None else (plan, rows)


def _cache_rows(caches, L: int, width: int, c):
    """(pointers uint64 [L, B] to every layer's buffer of every cache, rows held int64 [L, B], cdt) after
    next_rows, or None when the caches are not LatentCaches of L layers of one dtype the C attention reads. A
    cache's pointers are kept on it while its buffers stay the same (they change when it grows)."""
    ptrs, ns, dt = [], [], None
    for cache in caches:
        next_rows = getattr(cache, "next_rows", None)
        if next_rows is None or getattr(cache, "n_layers", None) != L:
            return None
        bufs, held = next_rows()
        got = getattr(cache, "_c_rows", None)
        if got is None or len(got[0]) != len(bufs) or not all(map(operator.is_, got[0], bufs)):
            d0 = bufs[0].dtype
            if d0 not in (np.float32, np.uint16) or any(
                    b.dtype != d0 or not b.flags.c_contiguous or b.ndim != 2 or b.shape[1] != width for b in bufs):
                return None
            got = (tuple(bufs), np.array([int(c.ffi.cast("uintptr_t", c.ffi.from_buffer("char[]", b))) for b in bufs],
                                         dtype=np.uint64), d0)
            cache._c_rows = got
        if dt is not None and got[2] != dt:
            return None                                 # one cdt per call (an engine's caches share one dtype)
        dt = got[2]
        ptrs.append(got[1])
        ns.append(held)
    return (np.ascontiguousarray(np.stack(ptrs, axis=1)), np.ascontiguousarray(np.array(ns, dtype=np.int64).T),
            0 if dt == np.float32 else 1)


def _layers_batched(plan, rows, t, x, caches, stats):
    """_layers_generic with the arguments of _batch_plan. A layer is pk_matmul_many (q, kv_a),
    pk_mla_absorbed_batch, pk_matmul_many (o_proj), pk_add_rms_norm (residual + post-attention norm), pk_route
    and pk_swiglu_batch (or the dense MLP's pk_swiglu_batch), then the residual add fused with the next layer's
    input norm (pk_add_rms_norm; pk_rms_norm before the first layer). The C norms are the Numba twins' loop bit
    for bit (and the single step's fused call normalises with them). Every call's arguments are put together
    before the first layer, while the Python objects they come from are still in the caches: between two
    layers the CPU streams ~400 MB of weights (real model), after which each Python object touched is a miss."""
    c = _probe._mods["c"]
    lib, ffi = c.lib, c.ffi
    fb = ffi.from_buffer
    B, L = len(caches), len(plan)
    bl0 = plan[0][1]
    D, dq, dkv, do = bl0.D, bl0.dq, bl0.dkv, bl0.do
    # the step's buffers, one allocation: the residual (x0: after the input norm's add, x1: after attention's)
    # | h | q | kva | o | att | m
    sizes = (D, D, D, dq, dkv, do, D, D)
    buf = np.empty(B * sum(sizes), dtype=np.float32)
    base = ffi.cast("float *", fb("float[]", buf))
    views, ptrs, off = [], [], 0
    for s in sizes:
        views.append(buf[off * B:(off + s) * B].reshape(B, s))
        ptrs.append(base + off * B)
        off += s
    x0, x1, hv, mv = views[0], views[1], views[2], views[7]
    x0p, x1p, hp, qp, kvap, op, attp, mp = ptrs
    x0[...] = x
    xs_h, ys_qkv = ffi.new("float *[]", [hp, hp]), ffi.new("float *[]", [qp, kvap])
    xs_o, ys_att = ffi.new("float *[]", [op]), ffi.new("float *[]", [attp])
    ns = ffi.new("int64_t[]", [B, B])
    # every layer's cache rows (_batch_plan made room): sequence b's row n of layer l is written
    rows_all, n_all, cdt = rows
    rows_p = ffi.cast("void **", fb("char[]", rows_all))
    n_p = ffi.cast("int64_t *", fb("int64_t[]", n_all))
    f_rms, f_add, f_mm, f_mla = lib.pk_rms_norm, lib.pk_add_rms_norm, lib.pk_matmul_many, lib.pk_mla_absorbed_batch
    f_route, f_swiglu = lib.pk_route, lib.pk_swiglu_batch
    moe: dict = {}                                 # (E, k, n_shared) -> the router's and the experts' buffers
    dense = None
    steps = []
    for layer, (lw, bl, _) in enumerate(plan):
        pre = ((f_rms, (x0p, B, D, bl.in_ln, bl.eps, hp)) if layer == 0 else
               (f_add, (x1p, mp, B, D, bl.in_ln, bl.eps, x0p, hp)))
        mla = (B,) + bl.mla + (qp, kvap) + bl.kv + (n_p + layer * B, rows_p + layer * B, cdt,
                                                     n_p + layer * B) + bl.kvb + (op,)
        post = (x0p, attp, B, D, bl.post_ln, bl.eps, x1p, hp)
        if not bl.E:
            if dense is None:                      # nsel 1, sel 0, coef 1 a row: the one expert of weight 1
                arrs = (np.ones(B, np.int32), np.zeros(B, np.int32), np.ones(B, np.float32))
                dense = (arrs, fb("int[]", arrs[0]), fb("int[]", arrs[1]), fb("float[]", arrs[2]))
            ffn = (None, (1, bl.mlp, hp, B, D, 1) + dense[1:] + (mp,))
        else:
            E, k, n_sh = bl.E, bl.k, bl.n_shared
            got = moe.get((E, k, n_sh))
            if got is None:
                kmax = k + n_sh
                r_f = np.empty(B * (2 * E + k + 1), np.float32)           # logits | scores | weights | margin
                ids = np.empty((B, k), np.int32)
                sel = np.full((B, kmax), E, np.int32)                      # the shared experts: record E, last
                coef = np.ones((B, kmax), np.float32)                      # ... of weight 1
                nsel = np.full(B, kmax, np.int32)
                rp = ffi.cast("float *", fb("float[]", r_f))
                got = moe[(E, k, n_sh)] = (
                    (ids, sel[:, :k], coef[:, :k], r_f[B * 2 * E:B * (2 * E + k)].reshape(B, k)),
                    (rp, rp + B * E, fb("int[]", ids), rp + 2 * B * E, rp + B * (2 * E + k)),
                    (kmax, fb("int[]", nsel), fb("int[]", sel), fb("float[]", coef)), (r_f, nsel, sel, coef))
            ffn = (got[0], (B, hp, D) + bl.route + got[1], (hp, B, D) + got[2] + (mp,))
        steps.append((lw, bl, pre, bl.qkv_head + (xs_h, ns) + bl.qkv_tail + (ys_qkv,), mla,
                      bl.o_head + (xs_o, ns) + bl.o_tail + (ys_att,), post, ffn))
    nbytes, eb, any_moe = 0, 0, False
    n_experts = []
    for layer, (lw, bl, pre, qkv, mla, o, post, ffn) in enumerate(steps):
        pre[0](*pre[1])
        rc = f_mm(*qkv)
        if rc != 0:
            raise MemoryError(f"pk_matmul_many failed ({rc})")
        rc = f_mla(*mla)
        if rc != 0:
            raise (MemoryError if rc == -1 else ValueError)(f"pk_mla_absorbed_batch failed ({rc})")
        rc = f_mm(*o)
        if rc != 0:
            raise MemoryError(f"pk_matmul_many failed ({rc})")
        f_add(*post)
        nbytes += bl.nbytes
        if ffn[0] is None:                         # dense MLP
            rc = f_swiglu(*ffn[1])
        else:
            any_moe = True
            rc = f_route(*ffn[1])
            if rc != 0:
                raise (MemoryError if rc == -1 else ValueError)(f"pk_route failed ({rc})")
            # per row the routed experts in ascending id order (pk_route writes them so: its contract, the
            # order of the single step's pk_moe), then the shared experts
            ids, sel_k, coef_k, wts = ffn[0]
            sel_k[...] = ids
            coef_k[...] = wts
            chosen = set(ids.ravel().tolist())
            if not bl.have.issuperset(chosen):
                if not all(bl.add(e, lw, c) for e in sorted(chosen - bl.have)):
                    # an expert C does not read: this layer's FFN stage by stage
                    m, nb = _ffn_generic(lw, t, hv.copy(), stats, n_experts)
                    if stats is not None:
                        nbytes += nb - bl.ffn_nbytes  # the router's and shared experts' bytes are counted above
                    mv[...] = m
                    continue
            rc = f_swiglu(bl.E + bl.n_shared, bl.full, *ffn[2])
            if stats is not None:
                e_b = sum(map(bl.ebytes.__getitem__, chosen))
                eb += e_b
                nbytes += e_b
                n_experts.append(len(chosen))
        if rc != 0:
            raise (MemoryError if rc == -1 else ValueError)(f"pk_swiglu_batch failed ({rc})")
    for cache in caches:
        cache.commit_rows()
    np.add(x1, mv, out=x1)
    if stats is not None and any_moe:
        stats["expert_bytes"] = stats.get("expert_bytes", 0) + eb
    return x1, nbytes, n_experts


_SINGLE_READS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _single_step_reads(model) -> dict:
    """decode_batch's stats for one sequence: every dense weight, the router, the shared experts and k routed
    experts a MoE layer, lm_head (the same every step, so counted once per model)."""
    got = _SINGLE_READS.get(model)
    if got is None:
        t = model.text
        nbytes, eb, per_layer = 0, 0, []
        for layer in range(t.num_hidden_layers):
            lw = model.layer_weights(layer)
            a = lw.attn
            nbytes += sum(_nbytes(w) for w in (a.q_proj, a.kv_a_proj_with_mqa, a.o_proj, a.kv_b_proj))
            if not lw.is_moe:
                nbytes += sum(_nbytes(w) for w in lw.mlp)
                continue
            one = sum(_nbytes(w) for w in lw.get_expert(0))
            eb += t.num_experts_per_tok * one
            nbytes += _nbytes(lw.gate_w) + (sum(_nbytes(w) for w in lw.shared) if lw.shared is not None else 0)
            per_layer.append(t.num_experts_per_tok)
        name = "language_model.lm_head.weight"
        head = model._kept(name, lambda: model.ckpt.weight(name))
        got = {"bytes_read": nbytes + eb + _nbytes(head), "expert_bytes": eb, "experts_per_layer": per_layer}
        _SINGLE_READS[model] = got
    return dict(got)


def _nbytes(w) -> int:
    if w is None:
        return 0
    if isinstance(w, np.ndarray):
        return int(w.nbytes)
    n = getattr(w, "nbytes", None)
    if callable(n):
        return int(n())
    if n is not None:
        return int(n)
    data = getattr(w, "data", None)
    return int(data.nbytes) if data is not None else 0


# ---------------------------------------------------------------------------------------------------------
# Reuse
# ---------------------------------------------------------------------------------------------------------
class ImageFeatureCache:
    """Image features keyed by pixel content (sha256 of the patch array and grid), least recently used out
    first, at most ``max_bytes`` of features."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes = int(max_bytes)
        self._d: collections.OrderedDict = collections.OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(pixels: np.ndarray, grid) -> str:
        h = hashlib.sha256(np.ascontiguousarray(pixels).view(np.uint8).tobytes())
        h.update(np.asarray(grid, dtype=np.int64).tobytes())
        return h.hexdigest()

    def get(self, key: str):
        f = self._d.get(key)
        if f is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return f

    def put(self, key: str, feats: np.ndarray) -> None:
        if feats.nbytes > self.max_bytes:
            return
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        self._d[key] = feats
        self.bytes += feats.nbytes
        while self.bytes > self.max_bytes:
            _, f = self._d.popitem(last=False)
            self.bytes -= f.nbytes


# ---------------------------------------------------------------------------------------------------------
# Sequences and the scheduler
# ---------------------------------------------------------------------------------------------------------
class Sequence:
    """One request inside the scheduler: its prompt, latent cache, sampling state and timings."""

    def __init__(self, req: Request, ids: np.ndarray, pixel_values, grids, params: SamplingParams, stops: set,
                 need_bytes: int):
        self.req = req
        self.ids = ids                                  # int64[S] prompt
        self.pixel_values = pixel_values
        self.grids = grids
        self.params = params
        self.stops = stops
        self.need_bytes = need_bytes                    # cache bytes reserved at admission
        self.x = None                                   # prompt embeddings [S, D] (made at the first chunk)
        self.cache = None
        self.done_tokens = 0                            # prompt positions in the cache
        self.reused = 0
        self.generated: list[int] = []
        self.counts: dict[int, int] = {}
        self.rng = np.random.default_rng(params.seed)
        self.next_token: int | None = None
        self.t_submit = time.perf_counter()
        self.t_start = None
        self.t_first = None
        self.t_end = None
        self.image_cached = 0


class Engine:
    """Continuous-batching scheduler over one model (see the module docstring and HELPERS.md's contract).

    parallel: sequences decoded together; max_context: a cap on positions per sequence (<= the model's);
    cache_budget_mb: latent cache of all sequences (and kept prefixes) together; max_queue: requests that may
    wait before submit raises QueueFull; prefill_chunk: prompt tokens per scheduler iteration (default: the
    model's, so a prompt is prefilled exactly as model.generate does); image_cache_mb: the feature cache;
    prefix_cache: keep finished caches for conversations that continue; cache_dtype: "f32" | "bf16" latent
    caches (default: the model's, load(cache_dtype=)) -- the budget counts their bytes."""

    def __init__(self, model, parallel: int = 4, max_context: int | None = None, cache_budget_mb: float | None = None,
                 max_queue: int = 64, prefill_chunk: int | None = None, image_cache_mb: float = 256,
                 prefix_cache: bool = True, cache_dtype: str | None = None):
        if isinstance(parallel, bool) or not isinstance(parallel, (int, np.integer)) or parallel < 1:
            raise InputError(f"parallel={parallel!r}: expected an integer >= 1")
        if max_context is not None and (not isinstance(max_context, (int, np.integer)) or max_context < 2):
            raise InputError(f"max_context={max_context!r}: expected an integer >= 2")
        if cache_budget_mb is not None and not cache_budget_mb > 0:
            raise InputError(f"cache_budget_mb={cache_budget_mb!r}: expected a positive number of MB")
        self.model = model
        self.parallel = int(parallel)
        self.max_context = min(model.context_limit, int(max_context)) if max_context else model.context_limit
        self.cache_budget = None if cache_budget_mb is None else int(cache_budget_mb * (1 << 20))
        self.max_queue = int(max_queue)
        self.prefill_chunk = int(prefill_chunk or model.prefill_chunk)
        self.images = ImageFeatureCache(int(image_cache_mb * (1 << 20)))
        self.prefix_cache = bool(prefix_cache)
        self.cache_dtype = cache_dtype_name(model.cache_dtype if cache_dtype is None else cache_dtype)
        self.bytes_per_token = model.new_cache(capacity=1, dtype=self.cache_dtype).bytes_per_token()
        self.default_stops = tuple(default_stop_ids(model))
        self._lock = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._active: list[Sequence] = []          # prefilling or decoding, in admission order
        self._kept: collections.OrderedDict = collections.OrderedDict()   # finished caches: key -> (ids, cache)
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = itertools.count(1)
        self.reserved = 0                          # bytes of caches of active sequences
        self.kept_bytes = 0
        self.metrics = collections.Counter()       # requests_total, tokens_generated, prompt_tokens, ...
        self.last_step: dict = {}                  # the last decode step: batch, seconds, bytes_read, ...
        self.decode_tps = 0.0                      # tokens per second of the last decode steps (smoothed)
        self.error: BaseException | None = None

    # -- life cycle ---------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="pykimi-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        with self._lock:
            rest = list(self._waiting) + list(self._active)
            self._waiting.clear()
            self._active.clear()
            self.reserved = 0
        for s in rest:
            s.req._finish(None, EngineStopped(f"request {s.req.id}: the engine stopped"))

    def warmup(self, timeout: float = 300.0) -> None:
        """One short request through the running engine (JIT compilation, first reads of the weights)."""
        ids = [i for i in range(1, 9) if i != self.model.config.media_placeholder_token_id]
        self.submit(ids, params=SamplingParams(max_new_tokens=2, stop_ids=())).result(timeout)
        for k in ("requests_total", "requests_finished", "prompt_tokens", "tokens_generated", "decode_steps",
                  "decode_seconds_total"):
            self.metrics.pop(k, None)
        self.decode_tps = 0.0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> int:
        return sum(1 for s in self._active if s.cache is not None and s.done_tokens >= len(s.ids))

    @property
    def queued(self) -> int:
        return len(self._waiting) + sum(1 for s in self._active if not (s.cache is not None
                                                                          and s.done_tokens >= len(s.ids)))

    # -- submission ---------------------------------------------------------------------------------------
    def submit(self, input_ids, pixel_values=None, image_grid_hws=None, params: SamplingParams | None = None,
               block: bool = False) -> Request:
        """Queue one request. Bad input raises InputError here (nothing queued); QueueFull when ``max_queue``
        requests wait (or, with block=True, waits for room)."""
        m = self.model
        params = (params or SamplingParams()).check(m.text.vocab_size)
        ids = m.check_ids(input_ids)
        S = int(ids.size)
        if S + params.max_new_tokens > self.max_context:
            if S >= self.max_context:
                raise InputError(f"the prompt has {S} tokens; the context limit is {self.max_context}")
            raise InputError(f"prompt of {S} tokens + max_new_tokens={params.max_new_tokens} exceeds the context "
                             f"limit of {self.max_context}; lower max_new_tokens")
        grids = None
        if pixel_values is not None or image_grid_hws is not None:
            if pixel_values is None or image_grid_hws is None:
                raise InputError("pixel_values and image_grid_hws go together")
            grids = np.asarray(image_grid_hws, dtype=np.int64).reshape(-1, 2)
            pixel_values = np.asarray(pixel_values, dtype=np.float32)
            n_patch = int((grids[:, 0] * grids[:, 1]).sum())
            if pixel_values.shape[0] != n_patch:
                raise InputError(f"pixel_values has {pixel_values.shape[0]} patches but image_grid_hws adds up to "
                                 f"{n_patch}")
            n_feat = int((grids[:, 0] * grids[:, 1]).sum() // 4)
            n_ph = int((ids == m.config.media_placeholder_token_id).sum())
            if n_ph != n_feat:
                raise InputError(f"input_ids hold {n_ph} image placeholder tokens but the images give {n_feat}")
        elif int((ids == m.config.media_placeholder_token_id).sum()):
            raise InputError("input_ids hold image placeholder tokens but no pixel_values were given")
        need = (S + params.max_new_tokens) * self.bytes_per_token
        if self.cache_budget is not None and need > self.cache_budget:
            raise InputError(f"the request needs {need / 2**20:.1f} MB of latent cache ({S} prompt tokens + "
                             f"max_new_tokens={params.max_new_tokens}), over the cache budget of "
                             f"{self.cache_budget / 2**20:.1f} MB; lower max_new_tokens")
        stops = set(self.default_stops if params.stop_ids is None else (int(s) for s in params.stop_ids))
        req = Request(next(self._ids), S)
        seq = Sequence(req, ids, pixel_values, grids, params, stops, need)
        with self._lock:
            if self._stop:
                raise EngineStopped("the engine is stopped; start() it again to submit")
            while len(self._waiting) >= self.max_queue:
                if not block:
                    raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue={self.max_queue})")
                self._lock.wait(0.1)
            self._waiting.append(seq)
            self.metrics["requests_total"] += 1
            self._lock.notify_all()
        return req

    # -- scheduler ----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    if self._stop:
                        return
                    self._drop_cancelled_waiting()
                    self._admit()
                    if not self._active:
                        self._lock.wait(0.05)
                        continue
                    active = list(self._active)
                self._step(active)
        except BaseException as e:  # noqa: BLE001 -- a bug: fail every request loudly rather than hang them
            self.error = e
            with self._lock:
                rest = list(self._waiting) + list(self._active)
                self._waiting.clear()
                self._active.clear()
            for s in rest:
                s.req._finish(None, e)

    def _drop_cancelled_waiting(self) -> None:
        for s in [s for s in self._waiting if s.req.cancelled]:
            self._waiting.remove(s)
            self._finish(s, "cancelled", emit_final=True)

    def _admit(self) -> None:
        while self._waiting and len(self._active) < self.parallel:
            s = self._waiting[0]
            if self.cache_budget is not None:
                while self.reserved + self.kept_bytes + s.need_bytes > self.cache_budget and self._kept:
                    self._evict_kept()
                if self.reserved + s.need_bytes > self.cache_budget:
                    return                                           # waits for a running sequence to end
            self._waiting.popleft()
            self.reserved += s.need_bytes
            self._active.append(s)

    def _evict_kept(self) -> None:
        _, (_, cache, nb) = self._kept.popitem(last=False)
        self.kept_bytes -= nb

    def _step(self, active: list) -> None:
        # cancellations: freed before any work of this step
        for s in [s for s in active if s.req.cancelled]:
            self._release(s)
            self._finish(s, "cancelled", emit_final=True)
            active.remove(s)
        prefilling = [s for s in active if s.next_token is None]
        decoding = [s for s in active if s.next_token is not None]
        # a failure (bad input found late, e.g. an image the vision tower refuses) ends the requests it
        # concerns with that error; the engine and the other sequences go on
        if prefilling:
            try:
                self._prefill_chunk(prefilling[0])
            except Exception as e:  # noqa: BLE001 -- handed to the request's owner
                self._fail(prefilling[0], e)
        if decoding:
            try:
                self._decode(decoding)
            except Exception as e:  # noqa: BLE001
                for s in decoding:
                    if not s.req.done:
                        self._fail(s, e)

    def _embed(self, s: Sequence) -> np.ndarray:
        m = self.model
        feats = None
        if s.pixel_values is not None:
            parts, off = [], 0
            for gh, gw in s.grids:
                n = int(gh * gw)
                px = s.pixel_values[off:off + n]
                off += n
                key = self.images.key(px, (gh, gw))
                f = self.images.get(key)
                if f is None:
                    f = m.encode_images(px, np.array([[gh, gw]], dtype=np.int64))
                    self.images.put(key, f)
                else:
                    s.image_cached += 1
                parts.append(f)
            feats = np.concatenate(parts, axis=0)
        return embed_and_merge(s.ids, m.embed_table(), feats, m.config.media_placeholder_token_id)

    def _take_prefix(self, s: Sequence):
        """A kept cache whose conversation this prompt extends (it starts with that whole prompt): (cache, n
        rows reused), else (None, 0)."""
        best, best_n, best_key = None, 0, None
        ids = s.ids
        for key, (kids, cache, nb) in self._kept.items():
            prompt_len = key[1]
            n = min(len(kids), len(ids) - 1, len(cache))
            if n < prompt_len or n <= best_n:
                continue
            common = int(np.argmin(np.append(kids[:n] == ids[:n], False)))   # first mismatch
            if common >= prompt_len and common > best_n:
                best, best_n, best_key = cache, common, key
        if best is None:
            return None, 0
        _, _, nb = self._kept.pop(best_key)
        self.kept_bytes -= nb
        return best, best_n

    def _prefill_chunk(self, s: Sequence) -> None:
        m = self.model
        S = len(s.ids)
        if s.cache is None:
            s.t_start = time.perf_counter()
            s.x = self._embed(s)
            cache, n = self._take_prefix(s) if self.prefix_cache else (None, 0)
            if cache is not None:
                cache.truncate(n)
                cache.reserve(S + s.params.max_new_tokens)
                s.reused = n
                self.metrics["prefix_reused_tokens"] += n
            else:
                cache = m.new_cache(capacity=S + s.params.max_new_tokens, dtype=self.cache_dtype)
            s.cache = cache
            s.done_tokens = n
        c0 = s.done_tokens
        c1 = min(S, c0 + self.prefill_chunk)
        h = m.run_layers(s.x[c0:c1], s.cache)
        s.done_tokens = c1
        if c1 == S:
            logits = m.logits(h[-1:])[0]
            s.x = None
            s.t_first = time.perf_counter()
            self.metrics["prompt_tokens"] += S
            self._pick(s, logits)

    def _decode(self, seqs: list) -> None:
        t0 = time.perf_counter()
        stats: dict = {}
        logits = decode_batch(self.model, [s.next_token for s in seqs], [s.cache for s in seqs], stats)
        dt = time.perf_counter() - t0
        self.last_step = dict(batch=len(seqs), seconds=dt, **stats)
        self.metrics["decode_steps"] += 1
        self.metrics["decode_seconds_total"] += dt
        tps = len(seqs) / dt if dt > 0 else 0.0
        self.decode_tps = tps if self.decode_tps == 0 else 0.8 * self.decode_tps + 0.2 * tps
        for s, row in zip(seqs, logits):
            self._pick(s, row)

    def _pick(self, s: Sequence, logits: np.ndarray) -> None:
        """Choose the next token of s from its logits, emit it, finish or queue it for the next step."""
        if not np.isfinite(logits).all():         # never a token from NaN / inf (argmax of all-NaN is id 0)
            where = "the prompt" if not s.generated else f"decode step {len(s.generated)}"
            self._fail(s, NumericsError(
                f"request {s.req.id}: non-finite values (NaN/inf) in the logits after {where}; `pykimi run` on "
                f"the same prompt names the first stage that went non-finite (model {self.model.ckpt.path})"))
            return
        p = s.params
        z = logits
        if p.repetition_penalty != 1.0:
            seen = np.unique(np.concatenate([s.ids, np.asarray(s.generated, dtype=np.int64)]))
            z = apply_repetition_penalty(z.copy(), seen, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and s.counts:
            z = z.copy() if z is logits else z
            idx = np.fromiter(s.counts.keys(), dtype=np.int64)
            cnt = np.fromiter(s.counts.values(), dtype=np.float32)
            z[idx] -= np.float32(p.presence_penalty) + np.float32(p.frequency_penalty) * cnt
        if p.logit_bias:
            z = z.copy() if z is logits else z
            for k, v in p.logit_bias.items():
                z[int(k)] += np.float32(v)
        tok = pick_token(z, s.rng, p.temperature, p.top_k, p.top_p, p.min_p)
        lp = top = None
        if p.logprobs:
            zz = z.astype(np.float64)
            mx = zz.max()
            lse = mx + np.log(np.exp(zz - mx).sum())
            lp = float(zz[tok] - lse)
            k = min(p.logprobs, zz.size)
            best = np.argpartition(-zz, k - 1)[:k]
            best = best[np.lexsort((best, -zz[best]))]
            top = [(int(i), float(zz[i] - lse)) for i in best]
        s.generated.append(tok)
        s.counts[tok] = s.counts.get(tok, 0) + 1
        self.metrics["tokens_generated"] += 1
        reason = None
        if tok in s.stops:
            reason = "stop"
        elif len(s.generated) >= p.max_new_tokens:
            reason = "length"
        if reason is None:
            s.next_token = tok
            s.req._emit(Event(tok, lp, top, None))
            return
        s.next_token = None
        s.req._emit(Event(tok, lp, top, reason))
        self._release(s, keep=True)
        self._finish(s, reason)

    def _release(self, s: Sequence, keep: bool = False) -> None:
        with self._lock:
            if s in self._active:
                self._active.remove(s)
                self.reserved -= s.need_bytes
            if keep and self.prefix_cache and s.cache is not None:
                # the rows held: prompt + generated[:-1] (the last token was never fed through the model)
                kids = np.concatenate([s.ids, np.asarray(s.generated[:-1], dtype=np.int64)])[:len(s.cache)]
                nb = s.cache.nbytes()
                if self.cache_budget is None or nb <= self.cache_budget // 2:
                    self._kept[(s.req.id, len(s.ids))] = (kids, s.cache, nb)
                    self.kept_bytes += nb
                    limit = self.cache_budget // 2 if self.cache_budget is not None else 256 << 20
                    while self.kept_bytes > limit or len(self._kept) > 4 * self.parallel:
                        self._evict_kept()
            s.cache = None if not keep else s.cache
            self._lock.notify_all()

    def _fail(self, s: Sequence, error: BaseException) -> None:
        self._release(s)
        s.next_token = None
        self.metrics["requests_failed"] += 1
        s.req._finish(None, error)

    def _finish(self, s: Sequence, reason: str, emit_final: bool = False) -> None:
        s.t_end = time.perf_counter()
        if emit_final:
            s.req._emit(Event(None, None, None, reason))
        n = len(s.generated)
        t_start = s.t_start or s.t_end
        t_first = s.t_first or s.t_end
        prompt_s = t_first - t_start
        decode_s = s.t_end - t_first
        timings = {
            "queue_ms": 1e3 * (t_start - s.t_submit),
            "ttft_ms": 1e3 * (t_first - s.t_submit),
            "prompt_n": len(s.ids) - s.reused, "prompt_ms": 1e3 * prompt_s,
            "prompt_per_second": (len(s.ids) - s.reused) / prompt_s if prompt_s > 0 else 0.0,
            "predicted_n": n, "predicted_ms": 1e3 * decode_s,
            "predicted_per_second": (n - 1) / decode_s if decode_s > 0 and n > 1 else 0.0,
            "cache_n": s.reused, "images_cached": s.image_cached,
        }
        if reason == "cancelled":
            self.metrics["requests_cancelled"] += 1
        else:
            self.metrics["requests_finished"] += 1
        s.req._finish(Result(list(s.generated), reason, len(s.ids), n, timings))
