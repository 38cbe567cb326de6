"""Kimi-VL configuration: frozen dataclasses read from config.json, validated loudly at load time.

Everything in the engine is driven by these values, so the tiny test checkpoints and the real one take the
same code path. A setting pykimi does not implement is refused here, not at layer 14 (DESIGN.md §Style 10).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

_WHERE = "config.json"


# Upper bounds on sizes, far above any released Kimi-VL / DeepSeek-V3 setting (27 or 61 layers, hidden 7168,
# vocabulary 163840, 256 experts). They keep a corrupted or hostile config.json from asking for a loop of
# 10^12 layers or an allocation of petabytes before anything is checked against the tensors (issue 19 #3);
# ``check_fits`` then bounds the sizes by what a checkpoint's tensors actually hold.
MAX_LAYERS = 4096
MAX_DIM = 1 << 20          # widths, intermediate sizes, LoRA ranks
MAX_HEADS = 1 << 12
MAX_HEAD_DIM = 1 << 12
MAX_VOCAB = 1 << 24
MAX_EXPERTS = 1 << 16
MAX_POSITIONS = 1 << 30
MAX_PATCH = 1 << 10
MAX_POS_TABLE = 1 << 12


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _need(d: dict, key: str, typ, where: str, positive: bool = True, hi=None, lo=None):
    """A required field of type int / float: finite, > 0 (positive) and within [lo, hi] when given."""
    if key not in d:
        raise ConfigError(f"{_WHERE}: {where}.{key} is missing")
    v = d[key]
    if typ is float and _is_int(v):
        v = float(v)
    if not isinstance(v, typ) or isinstance(v, bool) and typ is not bool:
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected {typ.__name__}")
    if typ is float and not math.isfinite(v):
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected a finite number")
    if positive and typ in (int, float) and v <= 0:
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected > 0")
    if lo is not None and v < lo:
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected >= {lo}")
    if hi is not None and v > hi:
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected <= {hi}")
    return v


def _opt_float(d: dict, key: str, default: float, where: str, lo: float = 0.0, hi: float = 1e12,
               lo_open: bool = True) -> float:
    """An optional float field: finite and in (lo, hi] (or [lo, hi] when not lo_open)."""
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v > hi \
            or (v <= lo if lo_open else v < lo):
        rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected a finite number in {rng}")
    return float(v)


def _opt_bool(d: dict, key: str, default: bool, where: str) -> bool:
    v = d.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected true or false")
    return v


def _opt_str(d: dict, key: str, default: str, where: str) -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise ConfigError(f"{_WHERE}: {where}.{key} = {v!r}, expected a string")
    return v


@dataclass(frozen=True)
class VisionConfig:
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    init_pos_emb_height: int
    init_pos_emb_width: int
    merge_kernel_size: tuple
    layer_norm_eps: float = 1e-5   # torch LayerNorm default; HF builds the vision norms without an eps (spec §6.3)
    rope_theta: float = 10000.0    # 2-D RoPE base (spec §6.4)
    rope_max_grid: int = 512       # the 2-D RoPE tables are built for 512 x 512 patches (spec §5.3)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        w = "vision_config"
        if not isinstance(d, dict):
            raise ConfigError(f"{_WHERE}: vision_config is missing or not an object")
        mt = d.get("model_type", "moonvit")
        if mt != "moonvit":
            raise ConfigError(f"{_WHERE}: vision_config.model_type = {mt!r}, expected 'moonvit'")
        mk = d.get("merge_kernel_size", [2, 2])
        if (not isinstance(mk, (list, tuple)) or len(mk) != 2
                or not all(_is_int(k) and 0 < k <= 64 for k in mk)):
            raise ConfigError(f"{_WHERE}: vision_config.merge_kernel_size = {mk!r}, expected [kh, kw] "
                              f"(positive integers <= 64)")
        c = cls(
            patch_size=_need(d, "patch_size", int, w, hi=MAX_PATCH),
            hidden_size=_need(d, "hidden_size", int, w, hi=MAX_DIM),
            intermediate_size=_need(d, "intermediate_size", int, w, hi=MAX_DIM),
            num_hidden_layers=_need(d, "num_hidden_layers", int, w, hi=MAX_LAYERS),
            num_attention_heads=_need(d, "num_attention_heads", int, w, hi=MAX_HEADS),
            init_pos_emb_height=_need(d, "init_pos_emb_height", int, w, hi=MAX_POS_TABLE),
            init_pos_emb_width=_need(d, "init_pos_emb_width", int, w, hi=MAX_POS_TABLE),
            merge_kernel_size=tuple(mk),
        )
        if c.hidden_size % c.num_attention_heads:
            raise ConfigError(f"{_WHERE}: vision_config.hidden_size {c.hidden_size} is not divisible by "
                              f"num_attention_heads {c.num_attention_heads}")
        if c.head_dim % 4:
            raise ConfigError(f"{_WHERE}: vision head dim {c.head_dim} must be a multiple of 4 for the 2-D RoPE")
        return c


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int | None
    n_shared_experts: int | None
    num_experts_per_tok: int | None
    first_k_dense_replace: int
    moe_layer_freq: int
    topk_method: str
    scoring_func: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    hidden_act: str
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Any
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    tie_word_embeddings: bool
    attention_bias: bool
    kv_a_layernorm_eps: float = 1e-6  # HF builds kv_a_layernorm without the config eps (spec §8.2)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (self.n_routed_experts is not None and self.n_routed_experts > 0
                and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0)

    @property
    def n_moe_layers(self) -> int:
        """How many layers ``is_moe_layer`` selects, in closed form (no loop over the layers): the multiples
        of moe_layer_freq in [first_k_dense_replace, num_hidden_layers)."""
        if not self.n_routed_experts:
            return 0
        a, L, f = self.first_k_dense_replace, self.num_hidden_layers, self.moe_layer_freq
        if a >= L:
            return 0
        return (L - 1) // f - ((a - 1) // f if a > 0 else -1)

    @classmethod
    def from_dict(cls, d: dict) -> "TextConfig":
        w = "text_config"
        if not isinstance(d, dict):
            raise ConfigError(f"{_WHERE}: text_config is missing or not an object")
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("deepseek_v3", "deepseek_v2", "kimi_vl_text"):
            raise ConfigError(f"{_WHERE}: text_config.model_type = {mt!r}, expected 'deepseek_v3'")

        def opt_int(key, default=None, hi=MAX_EXPERTS):
            v = d.get(key)
            if v is None:               # absent or null: the default (HF's DeepseekV3Config defaults)
                v = default
            if v is not None and (not _is_int(v) or v < 0 or v > hi):
                raise ConfigError(f"{_WHERE}: text_config.{key} = {v!r}, expected an integer in 0..{hi} or null")
            return v

        vocab = _need(d, "vocab_size", int, w, hi=MAX_VOCAB)

        def token_id(key):
            v = d.get(key)
            if v is not None and (not _is_int(v) or not 0 <= v < vocab):
                raise ConfigError(f"{_WHERE}: text_config.{key} = {v!r}, expected an id below vocab_size {vocab} "
                                  f"or null")
            return v

        c = cls(
            vocab_size=vocab,
            hidden_size=_need(d, "hidden_size", int, w, hi=MAX_DIM),
            intermediate_size=_need(d, "intermediate_size", int, w, hi=MAX_DIM),
            moe_intermediate_size=opt_int("moe_intermediate_size", 0, hi=MAX_DIM) or 0,
            num_hidden_layers=_need(d, "num_hidden_layers", int, w, hi=MAX_LAYERS),
            num_attention_heads=_need(d, "num_attention_heads", int, w, hi=MAX_HEADS),
            q_lora_rank=opt_int("q_lora_rank", hi=MAX_DIM),
            kv_lora_rank=_need(d, "kv_lora_rank", int, w, hi=MAX_DIM),
            qk_nope_head_dim=_need(d, "qk_nope_head_dim", int, w, hi=MAX_HEAD_DIM),
            qk_rope_head_dim=_need(d, "qk_rope_head_dim", int, w, hi=MAX_HEAD_DIM),
            v_head_dim=_need(d, "v_head_dim", int, w, hi=MAX_HEAD_DIM),
            n_routed_experts=opt_int("n_routed_experts"),
            n_shared_experts=opt_int("n_shared_experts"),
            num_experts_per_tok=opt_int("num_experts_per_tok"),
            first_k_dense_replace=opt_int("first_k_dense_replace", 0, hi=MAX_LAYERS),
            moe_layer_freq=opt_int("moe_layer_freq", 1, hi=MAX_LAYERS) or 1,
            topk_method=_opt_str(d, "topk_method", "noaux_tc", w),
            scoring_func=_opt_str(d, "scoring_func", "sigmoid", w),
            n_group=opt_int("n_group", 1) or 1,
            topk_group=opt_int("topk_group", 1) or 1,
            norm_topk_prob=_opt_bool(d, "norm_topk_prob", True, w),
            routed_scaling_factor=_opt_float(d, "routed_scaling_factor", 1.0, w, hi=1e6),
            hidden_act=_opt_str(d, "hidden_act", "silu", w),
            rms_norm_eps=_need(d, "rms_norm_eps", float, w, hi=1.0),
            rope_theta=_need(d, "rope_theta", float, w, hi=1e12),
            rope_scaling=d.get("rope_scaling"),
            max_position_embeddings=_need(d, "max_position_embeddings", int, w, hi=MAX_POSITIONS),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
            pad_token_id=token_id("pad_token_id"),
            tie_word_embeddings=_opt_bool(d, "tie_word_embeddings", False, w),
            attention_bias=_opt_bool(d, "attention_bias", False, w),
        )
        c._validate()
        return c

    def _validate(self):
        def bad(msg):
            raise ConfigError(f"{_WHERE}: text_config: {msg}")

        if self.rope_scaling is not None:
            bad(f"rope_scaling = {self.rope_scaling!r} is not implemented (the released model has null)")
        if self.hidden_act != "silu":
            bad(f"hidden_act = {self.hidden_act!r} is not implemented (expected 'silu')")
        if self.attention_bias:
            bad("attention_bias = true is not implemented (the released model has false)")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim = {self.qk_rope_head_dim} must be even")
        if self.n_routed_experts:
            if not self.num_experts_per_tok or self.num_experts_per_tok > self.n_routed_experts:
                bad(f"num_experts_per_tok = {self.num_experts_per_tok} must be in 1..n_routed_experts "
                    f"({self.n_routed_experts})")
            if self.scoring_func not in ("sigmoid", "softmax"):
                bad(f"scoring_func = {self.scoring_func!r} is not implemented (expected 'sigmoid')")
            if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
                bad(f"topk_method = {self.topk_method!r} is not implemented (expected 'noaux_tc')")
            if self.n_routed_experts % self.n_group:
                bad(f"n_routed_experts {self.n_routed_experts} is not divisible by n_group {self.n_group}")
            if self.topk_group > self.n_group:
                bad(f"topk_group {self.topk_group} > n_group {self.n_group}")
            if self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size must be > 0 when n_routed_experts is set")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad(f"first_k_dense_replace {self.first_k_dense_replace} > num_hidden_layers {self.num_hidden_layers}")


LM_ONLY_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")   # Moonlight-16B-A3B(-Instruct): the LM alone, flat config


@dataclass(frozen=True)
class KimiVLConfig:
    """A Kimi-VL config, or (``vision`` None) the language model alone: Moonlight-16B-A3B(-Instruct) ships a
    flat ``deepseek_v3`` config (the text_config fields at the top level, no vision_config) and tensors named
    ``model.*`` / ``lm_head.weight`` (``layout == "flat"``; pykimi.variants)."""
    vision: VisionConfig | None
    text: TextConfig
    media_placeholder_token_id: int | None
    vocab_size: int
    model_type: str = "kimi_vl"
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    path: str | None = None

    @property
    def has_vision(self) -> bool:
        return self.vision is not None

    @property
    def layout(self) -> str:
        """'kimi_vl' (language_model.model.*, vision_tower.*) or 'flat' (model.*, lm_head.weight: Moonlight)."""
        return "kimi_vl" if self.model_type == "kimi_vl" else "flat"

    @classmethod
    def from_dict(cls, d: dict, path: str | None = None) -> "KimiVLConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{_WHERE}: expected a JSON object")
        mt = d.get("model_type")
        if mt in LM_ONLY_MODEL_TYPES and "text_config" not in d:
            text = TextConfig.from_dict(d)
            return cls(vision=None, text=text, media_placeholder_token_id=None, vocab_size=text.vocab_size,
                       model_type=mt, raw=d, path=path)
        if mt != "kimi_vl":
            raise ConfigError(f"{_WHERE}: model_type = {mt!r}, expected 'kimi_vl' (a Kimi-VL checkpoint) or "
                              f"'deepseek_v3' (Moonlight, the language model alone)")
        vision = VisionConfig.from_dict(d.get("vision_config"))
        text = TextConfig.from_dict(d.get("text_config"))
        mp = d.get("media_placeholder_token_id")
        if not _is_int(mp) or not 0 <= mp < text.vocab_size:
            raise ConfigError(f"{_WHERE}: media_placeholder_token_id = {mp!r}, expected an id below vocab_size "
                              f"{text.vocab_size}")
        vocab = d.get("vocab_size", text.vocab_size)
        if not _is_int(vocab) or not 0 < vocab <= MAX_VOCAB:
            raise ConfigError(f"{_WHERE}: vocab_size = {vocab!r}, expected an integer in 1..{MAX_VOCAB}")
        return cls(vision=vision, text=text, media_placeholder_token_id=mp,
                   vocab_size=vocab, model_type=mt, raw=d, path=path)

    # ------------------------------------------------------------------------------------------------
    def n_tensors(self) -> int:
        """How many tensors the model reads (layout.expected_tensors without the ignored ones), in closed
        form: used to bound the config's sizes by a checkpoint before any per-layer table is built."""
        v, t = self.vision, self.text
        n = 0 if v is None else 3 + 12 * v.num_hidden_layers + 2 + 6  # vision tower + projector (none: Moonlight)
        per_layer = 2 + (3 if t.q_lora_rank else 1) + 4                # norms + MLA
        n_moe = t.n_moe_layers
        n += 1 + t.num_hidden_layers * per_layer + 1 + (0 if t.tie_word_embeddings else 1)
        n += (t.num_hidden_layers - n_moe) * 3
        n += n_moe * (3 * (t.n_routed_experts or 0) + 2 + (3 if t.n_shared_experts else 0))
        return n

    # ------------------------------------------------------------------------------------------------
    def param_counts(self) -> dict:
        """Parameter counts from the config alone: {'vision', 'projector', 'language', 'total',
        'active', 'active_no_embed', 'routed_experts'} (spec §1)."""
        v, t = self.vision, self.text
        if v is None:
            return self._lm_param_counts(0, 0)
        C, F = v.hidden_size, v.intermediate_size
        vis = 3 * v.patch_size ** 2 * C + C + v.init_pos_emb_height * v.init_pos_emb_width * C
        per_block = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (F * C + F) + (C * F + C)
        vis += v.num_hidden_layers * per_block + 2 * C
        kh, kw = v.merge_kernel_size
        M = C * kh * kw
        proj = 2 * C + (M * M + M) + (t.hidden_size * M + t.hidden_size)
        return self._lm_param_counts(vis, proj)

    def _lm_param_counts(self, vis: int, proj: int) -> dict:
        t = self.text
        H = t.hidden_size
        nh = t.num_attention_heads
        if t.q_lora_rank:
            q = H * t.q_lora_rank + t.q_lora_rank + t.q_lora_rank * nh * t.qk_head_dim
        else:
            q = H * nh * t.qk_head_dim
        attn = (q + H * (t.kv_lora_rank + t.qk_rope_head_dim) + t.kv_lora_rank
                + t.kv_lora_rank * nh * (t.qk_nope_head_dim + t.v_head_dim) + nh * t.v_head_dim * H)
        dense = 3 * H * t.intermediate_size
        expert = 3 * H * t.moe_intermediate_size
        shared = expert * (t.n_shared_experts or 0)
        n_moe = t.n_moe_layers
        n_dense = t.num_hidden_layers - n_moe
        router = (t.n_routed_experts or 0) * H + (t.n_routed_experts or 0)
        layers_common = t.num_hidden_layers * (attn + 2 * H) + n_dense * dense + n_moe * (shared + router)
        routed_total = n_moe * (t.n_routed_experts or 0) * expert
        routed_active = n_moe * (t.num_experts_per_tok or 0) * expert
        embed = t.vocab_size * H
        head = 0 if t.tie_word_embeddings else t.vocab_size * H
        lm = layers_common + routed_total + embed + head + H
        active_lm = layers_common + routed_active + embed + head + H
        return {
            "vision": vis, "projector": proj, "language": lm, "total": vis + proj + lm,
            "active": active_lm, "active_no_embed": active_lm - embed - head,
            "routed_experts": routed_total, "routed_active": routed_active,
        }

    def summary(self) -> str:
        v, t = self.vision, self.text
        p = self.param_counts()
        n_moe = t.n_moe_layers

        def b(n):
            return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"

        if v is None:
            head = [f"language model only ({self.model_type}, flat layout: model.*, lm_head.weight)"
                    + (f" at {self.path}" if self.path else ""), "  no vision tower"]
        else:
            head = [
                f"Kimi-VL ({self.model_type})" + (f" at {self.path}" if self.path else ""),
                f"  vision  MoonViT: {v.num_hidden_layers} blocks, width {v.hidden_size}, {v.num_attention_heads} "
                f"heads x {v.head_dim}, MLP {v.intermediate_size}, patch {v.patch_size}, pos table "
                f"{v.init_pos_emb_height}x{v.init_pos_emb_width}, merge "
                f"{v.merge_kernel_size[0]}x{v.merge_kernel_size[1]}",
                f"  projector: {v.hidden_size * v.merge_kernel_size[0] * v.merge_kernel_size[1]} -> {t.hidden_size}"]
        lines = head + [
            f"  language  DeepSeek-V3 MLA/MoE: {t.num_hidden_layers} layers ({t.num_hidden_layers - n_moe} dense, "
            f"{n_moe} MoE), hidden {t.hidden_size}, {t.num_attention_heads} heads, q/k {t.qk_nope_head_dim}+"
            f"{t.qk_rope_head_dim}, v {t.v_head_dim}, kv_lora_rank {t.kv_lora_rank}, q_lora_rank {t.q_lora_rank}",
            f"  experts: {t.n_routed_experts} routed x {t.moe_intermediate_size} (top-{t.num_experts_per_tok}, "
            f"{t.scoring_func}, {t.topk_method}, scale {t.routed_scaling_factor}) + {t.n_shared_experts} shared; "
            f"dense FFN {t.intermediate_size}",
            f"  vocab {t.vocab_size}, rope theta {t.rope_theta:g}, context {t.max_position_embeddings}"
            + (f", media placeholder id {self.media_placeholder_token_id}" if v is not None else ""),
            f"  parameters: total {b(p['total'])} (vision {b(p['vision'])}, projector {b(p['projector'])}, "
            f"language {b(p['language'])}); active per token {b(p['active'])} "
            f"({b(p['active_no_embed'])} without embedding and lm_head)",
            f"  latent KV cache: {t.num_hidden_layers * (t.kv_lora_rank + t.qk_rope_head_dim) * 4} bytes/token (f32)",
        ]
        return "\n".join(lines)


def check_fits(cfg: KimiVLConfig, ckpt) -> None:
    """Bound the config's sizes by what the checkpoint's tensors can hold, from the headers alone and before
    any per-layer table or array is made (issue 19 #3): the model reads ``cfg.n_tensors()`` tensors and
    ``param_counts()['total']`` values, each stored in at least half a byte (int4 codes). A config asking
    for more cannot match the files (e.g. num_hidden_layers 10^12 on a 4-layer checkpoint)."""
    src = os.path.join(cfg.path, "config.json") if cfg.path else _WHERE
    need_t = cfg.n_tensors()
    have_t = len(ckpt)
    if need_t > have_t:
        raise ConfigError(f"{src}: these sizes need {need_t} tensors (text num_hidden_layers "
                          f"{cfg.text.num_hidden_layers}, n_routed_experts {cfg.text.n_routed_experts}"
                          + (f", vision num_hidden_layers {cfg.vision.num_hidden_layers}" if cfg.vision else "")
                          + f") but the checkpoint holds {have_t}")
    need_b = cfg.param_counts()["total"] // 2
    have_b = ckpt.total_bytes()
    if need_b > have_b:
        raise ConfigError(f"{src}: these sizes need {cfg.param_counts()['total']} parameters (at least "
                          f"{need_b} bytes) but the checkpoint's tensors hold {have_b} bytes")


def load_config(path: str) -> KimiVLConfig:
    """Read and validate config.json from a checkpoint directory (or the file itself)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        f = os.path.join(path, "config.json")
    else:
        f = path
    if not os.path.exists(os.path.dirname(os.path.abspath(f))) or not os.path.exists(path):
        raise ConfigError(f"{path}: no such checkpoint directory")
    if not os.path.exists(f):
        raise ConfigError(f"{f}: config.json is missing (expected a Hugging Face checkpoint directory)")
    if f is path and not f.endswith(".json"):
        raise ConfigError(f"{path}: this is a file; pass the checkpoint directory "
                          f"({os.path.dirname(os.path.abspath(path))}) or its config.json")
    try:
        with open(f, encoding="utf-8") as fh:
            d = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{f}: not valid JSON ({type(e).__name__}: {e})") from None
    try:
        return KimiVLConfig.from_dict(d, path=os.path.dirname(os.path.abspath(f)))
    except ConfigError as e:
        raise ConfigError(str(e).replace(_WHERE, f, 1)) from None
