"""The Kimi-VL model: embedding + image merge, 27 Moonlight decoder layers, final norm, lm_head (spec §8).

Stage functions are pure and module-level, weights passed as arguments, so a notebook can run any stage by
hand (``decoder_layer(x, model.layer_weights(5), cache, positions, model.config.text, 5)``):

    embed_and_merge(ids, embed_table, image_features, placeholder_id)  -> [S, D]     (spec §8.1)
    decoder_layer(x, layer_weights, cache, positions, cfg, layer)     -> [S, D]     (spec §8.2)
    final_norm(x, w, eps)                                               -> [S, D]
    lm_head(x, w)                                                       -> [S, V]

:class:`KimiVL` ties them to a memory-mapped :class:`pykimi.weights.Checkpoint`; weights stay in their stored
dtype and are widened per use by ``pykimi.kernels.matmul``. :func:`load` is ``pykimi.load``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np

from . import kernels, progress
from .attention import MLAWeights, mla_decode, mla_prefill
from .cache import LatentCache, cache_dtype_name
from .errors import InputError
from .moe import RouterRule, RoutingRecord  # noqa: F401  (RoutingRecord re-exported for notebooks)
from .moe import dense_mlp, moe_decode, moe_forward, route, route_logits, router_rule, swiglu_sum
from .ops import add_rms_norm, rms_norm
from .trace import active as trace_active, emit, emit_record, wants as trace_wants
from .weights import Checkpoint, Stored, bf16_to_f32, f32_of

LM = "language_model.model"


# ---------------------------------------------------------------------------------------------------------
# Stage functions
# ---------------------------------------------------------------------------------------------------------
def embed_rows(embed_table, ids: np.ndarray) -> np.ndarray:
    """Rows ``ids`` of the embedding table as float32   # [S] -> [S, D]. Reads only those rows of the mmap."""
    if isinstance(embed_table, Stored):
        rows = embed_table.data[ids]                                    # fancy index: copies S rows only
        if embed_table.dtype == "BF16":
            return bf16_to_f32(rows)
        return rows.astype(np.float32)
    if isinstance(embed_table, np.ndarray):
        return np.asarray(embed_table[ids], dtype=np.float32)
    out = np.empty((ids.size, embed_table.shape[1]), dtype=np.float32)  # a quantized table (any Weight)
    for j, i in enumerate(np.asarray(ids).reshape(-1)):
        out[j] = embed_table.rows_f32(int(i), int(i) + 1)[0]
    return out


def embed_and_merge(ids: np.ndarray, embed_table, image_features: np.ndarray | None,
                    placeholder_id: int) -> np.ndarray:
    """Token embeddings with image features written, in order, at the placeholder positions (spec §8.1).

    ids [S] int, embed_table [V, D], image_features f32[T, D] or None   -> f32[S, D].
    The number of placeholders must equal T (one-line InputError otherwise).
    """
    ids = np.asarray(ids)
    x = embed_rows(embed_table, ids)                                    # [S, D]
    where = np.flatnonzero(ids == placeholder_id)
    n_feat = 0 if image_features is None else int(image_features.shape[0])
    if where.size != n_feat:
        raise InputError(f"input_ids hold {where.size} image placeholder tokens (id {placeholder_id}) but the "
                         f"images give {n_feat} image tokens; expand each image's placeholder to its token count")
    if n_feat:
        if image_features.shape[1] != x.shape[1]:
            raise InputError(f"image features have width {image_features.shape[1]}, expected {x.shape[1]}")
        x[where] = image_features                                       # in prompt order
    return x


def final_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """``language_model.model.norm``: RMSNorm (spec §8.2)   # [S, D]."""
    return kernels.fast(rms_norm)(x, w, eps)


def lm_head(x: np.ndarray, w) -> np.ndarray:
    """Logits ``x @ W.T`` in fp32   # x [S, D], W [V, D] -> [S, V].

    kernels.matmul reads W in its stored form (GEMV for few rows, bounded widened row tiles otherwise), so
    nothing of size V × D is ever widened at once (V = 163840 for the real model).
    """
    return kernels.matmul(np.asarray(x, dtype=np.float32), w)


@dataclass
class LayerWeights:
    """Everything decoder layer ``layer`` needs (the one table from checkpoint names to arguments).

    input_layernorm, post_attention_layernorm: f32[D]; attn: MLAWeights;
    dense layers: mlp = (gate [I, D], up [I, D], down [D, I]);
    MoE layers: gate_w f32[E, D], gate_bias f32[E] | None, get_expert(e) -> (gate, up, down),
    shared = (gate, up, down) | None, router: the RouterRule read from the config.
    """
    layer: int
    input_layernorm: np.ndarray
    post_attention_layernorm: np.ndarray
    attn: MLAWeights
    mlp: tuple | None = None
    gate_w: Any = None
    gate_bias: np.ndarray | None = None
    get_expert: Callable[[int], tuple] | None = None
    shared: tuple | None = None
    router: RouterRule | None = None

    @property
    def is_moe(self) -> bool:
        return self.gate_w is not None

    @classmethod
    def from_checkpoint(cls, ckpt, cfg, layer: int) -> "LayerWeights":
        """cfg: the TextConfig. Expert weights are *not* read here: only through get_expert(e)."""
        p = f"{LM}.layers.{layer}"
        kw: dict = dict(
            layer=layer,
            input_layernorm=ckpt.f32(f"{p}.input_layernorm.weight"),
            post_attention_layernorm=ckpt.f32(f"{p}.post_attention_layernorm.weight"),
            attn=MLAWeights.from_checkpoint(ckpt, layer, bool(cfg.q_lora_rank)),
        )

        def swiglu(prefix):
            return (ckpt.weight(f"{prefix}.gate_proj.weight"), ckpt.weight(f"{prefix}.up_proj.weight"),
                    ckpt.weight(f"{prefix}.down_proj.weight"))

        if cfg.is_moe_layer(layer):
            bias_name = f"{p}.mlp.gate.e_score_correction_bias"
            kw.update(gate_w=ckpt.f32(f"{p}.mlp.gate.weight"),             # router in fp32 (spec §8.4)
                      gate_bias=ckpt.f32(bias_name) if bias_name in ckpt else None,
                      get_expert=_memo(lambda e: swiglu(f"{p}.mlp.experts.{e}"), ckpt),
                      shared=swiglu(f"{p}.mlp.shared_experts") if cfg.n_shared_experts else None,
                      router=router_rule(cfg))
        else:
            kw.update(mlp=swiglu(f"{p}.mlp"))
        return cls(**kw)


def _memo(fn: Callable[[int], tuple], ckpt) -> Callable[[int], tuple]:
    """fn with its results kept: an expert's weights are resolved (read, and counted in
    ``ckpt.read_counter``) the first time a token chooses it, so experts nobody chose are never read, and
    reused after. ``read_counter.clear()`` starts a new generation: the kept weights are dropped and read
    again on their next use, which is how tests and tutorial 07 see which experts one step touched."""
    kept: dict = {}
    counter = ckpt.read_counter
    gen = [getattr(counter, "generation", 0)]

    def get(e: int) -> tuple:
        if gen[0] != getattr(counter, "generation", 0):
            kept.clear()
            gen[0] = counter.generation
        w = kept.get(e)
        if w is None:
            w = kept[e] = fn(e)
        return w
    # what the fused decode FFN's table of expert records (kernels/fused.py) checks: its records are
    # dropped with the kept weights when the generation changes
    get.generation = lambda: getattr(counter, "generation", 0)
    return get


def ffn(h: np.ndarray, lw: LayerWeights, cfg) -> np.ndarray:
    """The FFN of one layer on normalised h [S, D]: dense SwiGLU or routed + shared experts (spec §8.4)."""
    p = f"{LM}.layers.{lw.layer}.mlp"
    if not lw.is_moe:
        if h.shape[0] == 1:
            # one token: the dense MLP as a one-expert swiglu_sum of weight 1 (the same sum: 0 + 1 * y), whose
            # fast twin is the C call that the fused decode layer and the engine's batched step also make, so
            # their silu rounds like this one
            return kernels.fast(swiglu_sum)(h[0], [lw.mlp], [1.0])[None, :]
        return dense_mlp(h, *lw.mlp)
    rule = lw.router if lw.router is not None else router_rule(cfg)   # validated once, at load
    if h.shape[0] == 1 and not (trace_active() and trace_wants(*_routing_names(lw.layer))):
        # decode: the router and every expert in one call (fast twin of moe_decode); a trace that records or
        # edits the routing takes the path below, whose decisions are the same (fast(route) is the same C router)
        return kernels.fast(moe_decode)(h, lw.gate_w, lw.gate_bias, rule, lw.get_expert, lw.shared,
                                        n_experts=cfg.n_routed_experts)[0]
    rec = (kernels.fast(route) if h.shape[0] == 1 else route)(h, lw.gate_w, lw.gate_bias, rule)
    if trace_active():
        # Expose the decision; an edit of logits re-routes, an edit of ids/weights is used as given.
        logits = emit(f"{p}.gate.router_logits", rec.logits)
        if logits is not rec.logits:
            rec = route_logits(logits, lw.gate_bias, rule)
        rec.topk_ids = emit(f"{p}.topk_ids", rec.topk_ids)
        rec.topk_weights = emit(f"{p}.topk_weights", rec.topk_weights)
        rec.topk_margin = emit(f"{p}.topk_margin", rec.topk_margin)
        emit_record(f"{p}.routing", rec)
    return moe_forward(h, rec, lw.get_expert, lw.shared, n_experts=cfg.n_routed_experts)


@lru_cache(maxsize=None)
def _routing_names(layer: int) -> tuple:
    """The names ffn emits for the router's decision of ``layer`` (the fused decode FFN does not emit them)."""
    p = f"{LM}.layers.{layer}.mlp"
    return tuple(f"{p}.{n}" for n in ("gate.router_logits", "topk_ids", "topk_weights", "topk_margin", "routing"))


@lru_cache(maxsize=None)
def _layer_names(layer: int) -> tuple:
    """Every name layer ``layer`` emits on its decode path, the hidden attention names included: a trace that
    records or edits one of them runs the layer step by step (decoder_layer), the others take decode_layer's
    fused twin, which emits nothing."""
    from .attention import FUSED_DECODE_HIDES
    p = f"{LM}.layers.{layer}"
    return ((p, f"{p}.self_attn", f"{p}.mlp") + tuple(f"{p}.self_attn.{n}" for n in FUSED_DECODE_HIDES)
            + _routing_names(layer))


@lru_cache(maxsize=None)
def _stack_names(n_layers: int) -> tuple:
    return tuple(n for i in range(n_layers) for n in _layer_names(i))


def decode_layer(x: np.ndarray, lw: LayerWeights, cache: LatentCache, pos: int, cfg) -> np.ndarray:
    """ONE decode token through decoder layer ``lw.layer`` (spec §8.2-8.4), absorbed MLA   # x [1, D] -> [1, D].

    The definition is :func:`decoder_layer`'s composition for S = 1: RMSNorm_in -> mla_decode (q / kv_a
    projections, the absorbed attention over the latent cache writing row ``pos``, o_proj) -> residual add +
    RMSNorm_post -> ffn (dense SwiGLU or router + experts) -> residual add. Fast twin: kernels/fused.py
    (pk_decode_layer: the whole layer in ONE C call over a record of the layer's weights made once -- the
    stage by stage form was ~300 Python calls a layer and token, ~10 ms a token at 27 layers)."""
    eps = cfg.rms_norm_eps
    h = kernels.fast(rms_norm)(x, lw.input_layernorm, eps)
    a = mla_decode(h, lw.attn, cache, lw.layer, np.array([pos]), cfg)               # [1, D]
    x, h = kernels.fast(add_rms_norm)(x, a, lw.post_attention_layernorm, eps)
    return x + ffn(h, lw, cfg)                                                       # [1, D]


def decode_layers(x: np.ndarray, lws: list, cache: LatentCache, pos: int, cfg) -> np.ndarray:
    """ONE decode token through the decoder layers ``lws`` in order   # x [1, D] -> [1, D]: decode_layer after
    decode_layer. Fast twin: kernels/fused.py (pk_decode_layers: the whole stack in one C call -- even at one
    call a layer, the Python between the calls ran with its data evicted by the layer's weight stream, ~0.1 ms
    a layer)."""
    for lw in lws:
        x = decode_layer(x, lw, cache, pos, cfg)
    return x


def decoder_layer(x: np.ndarray, lw: LayerWeights, cache: LatentCache, positions, cfg, layer: int | None = None,
                  absorbed: bool = False) -> np.ndarray:
    """One pre-norm residual layer (spec §8.2)   # x [S, D] -> [S, D].

    x = x + MLA(RMSNorm_in(x));  x = x + FFN(RMSNorm_post(x)).  The new tokens' latent rows go into ``cache``.
    ``absorbed`` selects the decode formulation of MLA (equal up to rounding). One absorbed token that no
    trace looks inside goes through :func:`decode_layer`'s fast twin (one C call with the C backend).
    """
    layer = lw.layer if layer is None else layer
    traced = trace_active() and trace_wants(*_layer_names(layer))
    if absorbed and x.shape[0] == 1 and layer == lw.layer and not traced:
        return kernels.fast(decode_layer)(x, lw, cache, int(positions[-1]), cfg)
    p = f"{LM}.layers.{layer}"
    # the norms' fast twins (Numba: one call for the residual add and the next norm): the NumPy form is
    # several calls a norm, paid twice a layer per token
    h = kernels.fast(rms_norm)(x, lw.input_layernorm, cfg.rms_norm_eps)
    attn = mla_decode if absorbed else mla_prefill
    a = attn(h, lw.attn, cache, layer, positions, cfg)                 # [S, D]
    a = emit(f"{p}.self_attn", a)
    x, h = kernels.fast(add_rms_norm)(x, a, lw.post_attention_layernorm, cfg.rms_norm_eps)
    m = emit(f"{p}.mlp", ffn(h, lw, cfg))                         # [S, D]
    x = x + m
    return emit(p, x)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------
class KimiVL:
    """Kimi-VL on a memory-mapped checkpoint. Public API: DESIGN.md "Public API"."""

    def __init__(self, ckpt: Checkpoint, config=None, max_context: int | None = None, prefill_chunk: int = 512,
                 cache_absorbed: bool | None = None, vision_cache_weights: bool = False, cache_dtype="f32"):
        self.ckpt = ckpt
        self.config = config if config is not None else ckpt.config
        if self.config is None:
            raise InputError(f"{ckpt.path}: config.json is missing; pykimi.load needs a checkpoint directory")
        self.text = self.config.text
        if any(self.text.is_moe_layer(i) for i in range(self.text.num_hidden_layers)):
            router_rule(self.text)                   # the router's config checked once, here (ConfigError)
        if max_context is not None and (not isinstance(max_context, (int, np.integer)) or max_context < 1):
            raise InputError(f"max_context={max_context!r}: expected a positive integer")
        self.max_context = int(max_context) if max_context is not None else None
        self.prefill_chunk = max(1, int(prefill_chunk))
        self.cache_dtype = cache_dtype_name(cache_dtype)   # of every cache new_cache makes unless it is told
        # the f32 kv_b copy only pays where the absorbed products are NumPy matmuls; the C kernels read the
        # stored form (kernels.heads_vecmat / heads_matvec)
        self.cache_absorbed = (kernels.backend() != "c") if cache_absorbed is None else bool(cache_absorbed)
        self.vision_cache_weights = vision_cache_weights
        self.memory_lock = None                           # a memlock.MemoryLock after load(..., mlock=True)
        self._layers: dict[int, LayerWeights] = {}   # layer_weights() cache
        self._other: dict[str, object] = {}          # embedding, final norm, lm_head (see _kept)
        self._vision = None
        self.last_stats: dict = {}               # filled by generate(): prompt_tokens, new_tokens, prefill_s, ...

    # -- limits and inputs -------------------------------------------------------------------------------
    @property
    def context_limit(self) -> int:
        lim = self.text.max_position_embeddings
        return min(lim, self.max_context) if self.max_context is not None else lim

    def check_ids(self, input_ids) -> np.ndarray:
        """Validate input ids -> int64[S] (a [1, S] batch is accepted)."""
        try:
            ids = np.asarray(input_ids)
        except Exception:
            raise InputError("input_ids: expected a sequence of integer token ids") from None
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1 or ids.size == 0:
            raise InputError(f"input_ids: expected a non-empty 1-D sequence of token ids, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids: expected integer token ids, got dtype {ids.dtype}")
        V = self.text.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            bad = int(ids[(ids < 0) | (ids >= V)][0])
            raise InputError(f"input_ids: token id {bad} is outside the vocabulary [0, {V})")
        return ids.astype(np.int64)

    def check_length(self, n: int, what: str = "prompt") -> None:
        lim = self.context_limit
        if n > lim:
            src = (f"max_context={self.max_context}" if self.max_context is not None
                   and self.max_context < self.text.max_position_embeddings
                   else f"max_position_embeddings={self.text.max_position_embeddings}")
            raise InputError(f"{what} needs {n} positions, over the context limit of {lim} ({src})")

    # -- weights -----------------------------------------------------------------------------------------
    def layer_weights(self, layer: int) -> LayerWeights:
        """The weights of decoder layer ``layer`` (memory-mapped; expert weights fetched lazily).

        Built once per layer and kept: the objects are views of the mapped file plus the few small tensors
        widened to f32 (norms, router), so re-resolving ~50 names per layer per token (header lookups,
        quantization metadata, norm widening) is not paid again -- it was ~0.3 ms per layer per decoded
        token. Chosen experts are resolved on first use and kept the same way."""
        lw = self._layers.get(layer)
        if lw is None:
            lw = LayerWeights.from_checkpoint(self.ckpt, self.text, layer)
            if self.cache_absorbed:
                lw.attn.kv_b_f32 = f32_of(lw.attn.kv_b_proj)                 # [H*(dn+dv), R]
            self._layers[layer] = lw
        return lw

    def embed_table(self):
        """The embedding table in its stored form (rows are widened on lookup)."""
        name = f"{LM}.embed_tokens.weight"
        return self._kept(name, lambda: self.ckpt.tensor(name) if name in self.ckpt else self.ckpt.weight(name))

    def _kept(self, name: str, make):
        """A weight object (mmap view, or a small f32 copy) resolved once and kept, like layer_weights."""
        w = self._other.get(name)
        if w is None:
            w = self._other[name] = make()
        return w

    # -- images ------------------------------------------------------------------------------------------
    @property
    def vision(self):
        if self._vision is None:
            from .vision import VisionTower  # lazy: text-only use never imports or reads the vision tower
            self._vision = VisionTower(self.ckpt, self.config, cache_weights=self.vision_cache_weights)
        return self._vision

    def encode_images(self, pixel_values, image_grid_hws) -> np.ndarray:
        """MoonViT + projector for all images   # pixel_values [N, 3, 14, 14], grid [n_images, 2] -> f32[T, D]."""
        # the tower emits vision_tower.* and multi_modal_projector itself
        return np.asarray(self.vision.encode(pixel_values, image_grid_hws), dtype=np.float32)

    def _image_features(self, pixel_values, image_grid_hws, image_features):
        if image_features is not None:
            f = np.asarray(image_features, dtype=np.float32)
            if f.ndim != 2:
                raise InputError(f"image_features: expected [T, {self.text.hidden_size}], got shape {f.shape}")
            return f
        if pixel_values is None:
            if image_grid_hws is not None and len(image_grid_hws):
                raise InputError("image_grid_hws given without pixel_values")
            return None
        if image_grid_hws is None:
            raise InputError("pixel_values given without image_grid_hws ([n_images, 2] patch grid per image)")
        if getattr(self.config, "vision", True) is None:
            raise InputError(f"{self.ckpt.path} is a language model alone (no vision tower): it cannot take images")
        return self.encode_images(pixel_values, image_grid_hws)

    def embed(self, input_ids, pixel_values=None, image_grid_hws=None, image_features=None) -> np.ndarray:
        """``inputs_embeds``: embeddings with image features merged (spec §8.1)   # [S, D]."""
        ids = self.check_ids(input_ids)
        feats = self._image_features(pixel_values, image_grid_hws, image_features)
        x = embed_and_merge(ids, self.embed_table(), feats, self.config.media_placeholder_token_id)
        return emit("inputs_embeds", x)

    def new_cache(self, capacity: int = 256, dtype=None) -> LatentCache:
        """An empty latent cache for this model; dtype "f32" | "bf16" (default: the model's cache_dtype,
        from load(cache_dtype=))."""
        return LatentCache.for_config(self.text, capacity=capacity, max_len=self.context_limit,
                                      dtype=self.cache_dtype if dtype is None else dtype)

    # -- running -----------------------------------------------------------------------------------------
    def run_layers(self, x: np.ndarray, cache: LatentCache, absorbed: bool = False, progress=None) -> np.ndarray:
        """All decoder layers + final norm for new tokens x [S, D] continuing ``cache``   -> [S, D]."""
        t = self.text
        start = len(cache)
        positions = np.arange(start, start + x.shape[0])               # plain 0..n-1 positions (spec §8.1)
        L = t.num_hidden_layers
        if absorbed and x.shape[0] == 1 and not (trace_active() and trace_wants(*_stack_names(L))):
            # one decode token that no trace looks inside: the whole stack in one call (decode_layers' twin)
            x = kernels.fast(decode_layers)(x, [self.layer_weights(i) for i in range(L)], cache, start, t)
            if progress is not None:
                progress.update(L)
            L = 0
        for layer in range(L):
            x = decoder_layer(x, self.layer_weights(layer), cache, positions, t, layer, absorbed=absorbed)
            if progress is not None:
                progress.update(1)
        x = final_norm(x, self._kept(f"{LM}.norm.weight", lambda: self.ckpt.f32(f"{LM}.norm.weight")), t.rms_norm_eps)
        return emit(f"{LM}.norm", x)

    def logits(self, h: np.ndarray) -> np.ndarray:
        name = "language_model.lm_head.weight"
        return emit("logits", lm_head(h, self._kept(name, lambda: self.ckpt.weight(name))))

    def prefill(self, inputs_embeds: np.ndarray, cache: LatentCache, all_logits: bool = True) -> np.ndarray:
        """Run the prompt through the model in chunks of ``prefill_chunk`` tokens (expanded MLA).

        Returns logits f32[S, V] (all_logits) or f32[V] for the last position only.
        """
        S = inputs_embeds.shape[0]
        self.check_length(len(cache) + S)
        cache.reserve(len(cache) + S)
        out = []
        n_chunks = -(-S // self.prefill_chunk)
        with progress.bar(n_chunks * self.text.num_hidden_layers, f"prefill {S} tokens", unit="layer") as pb:
            for c0 in range(0, S, self.prefill_chunk):
                c1 = min(S, c0 + self.prefill_chunk)
                h = self.run_layers(inputs_embeds[c0:c1], cache, progress=pb)
                if all_logits:
                    out.append(self.logits(h))
                elif c1 == S:
                    out.append(self.logits(h[-1:])[0])
        return out[0] if len(out) == 1 else np.concatenate(out, axis=0)

    def decode_step(self, token_id: int, cache: LatentCache) -> np.ndarray:
        """One new token at position len(cache), absorbed MLA over the latent cache   -> logits f32[V]."""
        self.check_length(len(cache) + 1)
        ids = np.array([int(token_id)], dtype=np.int64)
        x = emit("inputs_embeds", embed_rows(self.embed_table(), ids))   # [1, D]
        h = self.run_layers(x, cache, absorbed=True)
        return self.logits(h)[0]

    def forward(self, input_ids, pixel_values=None, image_grid_hws=None, image_features=None) -> np.ndarray:
        """Logits for every position   # input_ids [S] -> f32[S, vocab].

        ``image_features`` (f32[T, D]) may replace pixel_values/image_grid_hws, e.g. a projector dump.
        """
        ids = self.check_ids(input_ids)
        self.check_length(ids.size)
        x = self.embed(ids, pixel_values, image_grid_hws, image_features)
        cache = self.new_cache(capacity=ids.size)
        return self.prefill(x, cache, all_logits=True)

    __call__ = forward

    def generate(self, input_ids, pixel_values=None, image_grid_hws=None, max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed=None, stream: bool = False, stop_ids=None,
                 image_features=None, cache_dtype=None):
        """New token ids (list, or an iterator when stream=True); see :func:`pykimi.generate.generate`."""
        from .generate import generate
        return generate(self, input_ids, pixel_values=pixel_values, image_grid_hws=image_grid_hws,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                        min_p=min_p, repetition_penalty=repetition_penalty, seed=seed, stream=stream,
                        stop_ids=stop_ids, image_features=image_features, cache_dtype=cache_dtype)

    @property
    def stop_ids(self) -> list[int]:
        from .generate import default_stop_ids
        return default_stop_ids(self)

    def __repr__(self) -> str:
        return f"KimiVL({self.ckpt.path!r}, backend={kernels.backend()!r})"


def load(path, backend: str | None = None, threads: int | None = None, max_context: int | None = None,
         prefill_chunk: int = 512, cache_absorbed: bool | None = None, vision_cache_weights: bool = False,
         cache_dtype: str = "f32", mlock: bool = False, act_quant: str | None = None) -> KimiVL:
    """``pykimi.load``: open a checkpoint directory (HF layout) -> :class:`KimiVL`.

    Weights stay memory-mapped. backend: 'numpy' | 'numba' | 'c' (default: $PYKIMI_BACKEND or the fastest
    available); threads: kernel threads; max_context: a user cap on positions (<= max_position_embeddings);
    prefill_chunk: prompt tokens per chunk; cache_absorbed: keep each layer's kv_b_proj widened to f32 for the
    absorbed decode (27 × 8 MB for the real model); default: only when the backend is not 'c', whose
    kernels read the stored kv_b_proj directly; cache_dtype: 'f32' (default) or 'bf16', the latent KV cache's
    storage (bf16 halves it; see pykimi.cache and README "--cache-dtype" for the error bound); mlock: keep the
    mapped weights in RAM (pykimi.memlock; ``model.memory_lock`` says what was locked, else None) -- a
    ResourceError when the machine cannot; act_quant: how the C kernels treat activations, for the whole process
    as backend and threads are (kernels.set_act_quant: 'q4' the default, 'all' rounded as llama.cpp and PyTorch
    round them, 'none' exact f32 products; default: $PYKIMI_ACT_QUANT, else 'q4').
    """
    cache_dtype = cache_dtype_name(cache_dtype)         # a bad name fails here, before anything is opened
    if act_quant is not None:
        try:
            kernels.set_act_quant(act_quant)
        except ValueError:
            raise InputError(f"act_quant={act_quant!r}: expected one of {', '.join(kernels.linear._ACT_MODES)}") \
                from None
    if backend is not None:
        try:
            kernels.set_backend(backend)
        except ValueError as e:
            raise InputError(f"backend={backend!r}: {str(e).splitlines()[0]}") from None
    if threads is not None:
        if not isinstance(threads, (int, np.integer)) or threads < 1:
            raise InputError(f"threads={threads!r}: expected a positive integer")
        kernels.set_threads(int(threads))
    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    if cfg is None:
        from .config import load_config
        cfg = load_config(path)
    from .layout import validate_checkpoint
    validate_checkpoint(ckpt, cfg)                      # headers only: a wrong checkpoint fails here
    if max_context is not None and max_context > cfg.text.max_position_embeddings:
        raise InputError(f"max_context={max_context} exceeds max_position_embeddings="
                         f"{cfg.text.max_position_embeddings} of {path}")
    model = KimiVL(ckpt, cfg, max_context=max_context, prefill_chunk=prefill_chunk,
                   cache_absorbed=cache_absorbed, vision_cache_weights=vision_cache_weights, cache_dtype=cache_dtype)
    if mlock:
        model.memory_lock = ckpt.lock_in_memory()      # after every check: a refused lock leaves nothing locked
    return model
