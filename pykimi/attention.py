"""MLA -- DeepSeek-V3 Multi-head Latent Attention of the Moonlight LM (spec §8.3).

Two mathematically equal formulations (spec §8.3, last bullet):

* **expanded** (prefill, :func:`mla_prefill`): the cached latent ``c`` of every position is pushed through
  ``kv_b_proj`` to per-head ``k_nope`` and ``v``; scores are ``q_nope·k_nope + q_pe·k_pe``.
* **absorbed** (decode, :func:`mla_decode`): ``kv_b_proj`` is folded into the query
  (``q_lat[h] = W_uk[h]ᵀ q_nope[h]``, a vector in the 512-dim latent space) and into the output
  (``o[h] = W_uv[h] (Σ_n p[h,n] c_n)``), so attention runs directly over the latent cache and nothing of
  size ``positions × heads × 256`` is ever built.

Both read and write the same :class:`pykimi.cache.LatentCache`: per position the kv_a_layernorm'ed latent
(kv_lora_rank) and the rotated shared ``k_pe`` (qk_rope_head_dim), stored side by side in one row, so the
absorbed score is a single product ``[q_lat, q_pe] · [c, k_pe]``.

Every function here is pure: weights come in as arguments (a :class:`MLAWeights`), linear layers with stored
weights go through ``pykimi.kernels.matmul`` (x @ W.T).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from . import kernels
from .ops import apply_rope, rms_norm, softmax  # noqa: F401  (rms_norm: pykimi.attention.rms_norm stays public)
from .rope import lm_inv_freq, lm_rope_angles
from .kernels.ref import vecmat
from .weights import bf16_to_f32, f32_of, f32_to_bf16, rows_of
from . import trace  # a callable module: trace.emit / trace.wants here, pykimi.trace(model) for users
from .trace import emit


# ---------------------------------------------------------------------------------------------------------
# Weights of one attention block -- the one table from checkpoint names to arguments
# ---------------------------------------------------------------------------------------------------------
@dataclass
class MLAWeights:
    """Weights of ``language_model.model.layers.{l}.self_attn`` (what kernels.matmul takes for linears).

    q_proj:             [H*qk_head_dim, D]          (None when q_lora_rank is set)
    q_a_proj:           [q_lora_rank, D]            (q-LoRA path only)
    q_a_layernorm:      f32[q_lora_rank]            (q-LoRA path only)
    q_b_proj:           [H*qk_head_dim, q_lora_rank] (q-LoRA path only)
    kv_a_proj_with_mqa: [kv_lora_rank + rope, D]
    kv_a_layernorm:     f32[kv_lora_rank]
    kv_b_proj:          [H*(nope + v), kv_lora_rank]
    o_proj:             [D, H*v]
    kv_b_f32:           optional f32 copy of kv_b_proj for the absorbed decode (widened per use otherwise)
    """
    kv_a_proj_with_mqa: Any
    kv_a_layernorm: np.ndarray
    kv_b_proj: Any
    o_proj: Any
    q_proj: Any = None
    q_a_proj: Any = None
    q_a_layernorm: np.ndarray | None = None
    q_b_proj: Any = None
    kv_b_f32: np.ndarray | None = None

    @classmethod
    def from_checkpoint(cls, ckpt, layer: int, q_lora: bool) -> "MLAWeights":
        p = f"language_model.model.layers.{layer}.self_attn"
        kw = dict(
            kv_a_proj_with_mqa=ckpt.weight(f"{p}.kv_a_proj_with_mqa.weight"),
            kv_a_layernorm=ckpt.f32(f"{p}.kv_a_layernorm.weight"),
            kv_b_proj=ckpt.weight(f"{p}.kv_b_proj.weight"),
            o_proj=ckpt.weight(f"{p}.o_proj.weight"),
        )
        if q_lora:
            kw.update(q_a_proj=ckpt.weight(f"{p}.q_a_proj.weight"),
                      q_a_layernorm=ckpt.f32(f"{p}.q_a_layernorm.weight"),
                      q_b_proj=ckpt.weight(f"{p}.q_b_proj.weight"))
        else:
            kw.update(q_proj=ckpt.weight(f"{p}.q_proj.weight"))
        # Note: self_attn.rotary_emb.inv_freq is deliberately never read (bf16-rounded; spec §3, §8.3).
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------------
# Shared front part: projections, latent, RoPE
# ---------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _inv_freq(dim: int, theta: float) -> np.ndarray:
    """lm_inv_freq, computed once per (dim, theta) and kept read-only: every layer of every step needs it."""
    f = lm_inv_freq(dim, theta)
    f.flags.writeable = False
    return f


def rope_angles(positions, cfg) -> np.ndarray:
    """LM RoPE angles for the rope slice: pos · theta^(-2i/rope_dim), fp32 from the config   # [S, rope/2]."""
    return lm_rope_angles(np.asarray(positions), _inv_freq(cfg.qk_rope_head_dim, float(cfg.rope_theta)))


def mla_project(x: np.ndarray, w: MLAWeights, positions, cfg, layer: int | None = None):
    """Queries and the new cache rows for tokens ``x``   # x [S, D].

    Returns (q_nope [S, H, nope], q_pe [S, H, rope] rotated, c [S, R] normalised latent, k_pe [S, rope] rotated).
    """
    S = x.shape[0]
    H, dn, dr, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    if cfg.q_lora_rank:
        # q-LoRA (DeepSeek-V3 when q_lora_rank is set): q_b(RMSNorm(q_a(x))); the norm is built with the
        # RMSNorm default eps 1e-6 like kv_a_layernorm.
        qa = kernels.matmul(x, w.q_a_proj)                                       # [S, q_lora_rank]
        qa = kernels.fast(rms_norm)(qa, w.q_a_layernorm, cfg.kv_a_layernorm_eps)
        q = kernels.matmul(qa, w.q_b_proj)                                       # [S, H*(dn+dr)]
    else:
        q = kernels.matmul(x, w.q_proj)                                          # [S, H*(dn+dr)]
    q = q.reshape(S, H, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]                                      # [S, H, dn], [S, H, dr]

    a = kernels.matmul(x, w.kv_a_proj_with_mqa)                                  # [S, R + dr]
    c = kernels.fast(rms_norm)(a[:, :R], w.kv_a_layernorm, cfg.kv_a_layernorm_eps)   # [S, R] eps 1e-6 (§8.2)
    k_pe = a[:, R:]                                                              # [S, dr] one head, shared

    ang = rope_angles(positions, cfg)                                            # [S, dr/2]
    q_pe = apply_rope(q_pe, ang[:, None, :])                                     # interleaved pairs (spec §8.3)
    k_pe = apply_rope(k_pe, ang)
    if layer is not None:
        p = f"language_model.model.layers.{layer}.self_attn"
        q_pe = emit(f"{p}.q_rope", q_pe)
        k_pe = emit(f"{p}.k_rope", k_pe)
    return np.ascontiguousarray(q_nope), q_pe, c, k_pe


def _causal_mask(q_pos: np.ndarray, n_keys: int) -> np.ndarray:
    """True where key n is in the future of query s (key positions are 0..n_keys-1)   # [S, N] bool."""
    return np.arange(n_keys)[None, :] > np.asarray(q_pos)[:, None]


def _wants_probs(layer: int | None) -> bool:
    return layer is not None and trace.wants(f"language_model.model.layers.{layer}.self_attn.attn_probs")


# ---------------------------------------------------------------------------------------------------------
# Expanded form (prefill)
# ---------------------------------------------------------------------------------------------------------
# Queries per score block of mla_prefill. Why blocks: a query at position p sees keys 0..p only, so a block of
# queries needs the keys up to its last position -- about half the score and value products of a fresh prompt are
# never computed (at 512 tokens in blocks of 128: 1280 of 2048 key columns) -- and the scores held at once are
# [H, QUERY_BLOCK, keys] instead of [H, S, keys] (16 heads x 4096 x 4096 f32 was 1 GiB, and the softmax as much
# again). Per query the same products and the same softmax over its own row as one block of all queries.
QUERY_BLOCK = 128


def mla_prefill(x: np.ndarray, w: MLAWeights, cache, layer: int, positions, cfg,
                key_block: int = 4096, query_block: int = QUERY_BLOCK) -> np.ndarray:
    """MLA over new tokens ``x`` [S, D] at ``positions`` (contiguous, continuing the cache), expanded form.

    Writes the new latent rows into ``cache`` (layer ``layer``), then attends over every cached position.
    Returns the o_proj output [S, D] (before the residual add). Queries go in blocks of ``query_block``, each
    against the keys up to its last position (QUERY_BLOCK). When more than ``key_block`` positions are cached,
    keys/values are expanded and attended block by block with a running (online) softmax, so memory stays
    O(query_block × key_block) instead of O(S × N) scores plus an [N, H, 256] expansion. A trace that asks for
    ``attn_probs`` gets them whole: [H, S, N] in one block.
    """
    positions = np.asarray(positions)
    S = x.shape[0]
    H, dn, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    q_nope, q_pe, c, k_pe = mla_project(x, w, positions, cfg, layer)
    cache.write(layer, c, k_pe)                                                  # rounded in a bf16 cache
    N = cache.seq_len(layer)
    R = cfg.kv_lora_rank
    scale = np.float32(cfg.qk_head_dim ** -0.5)                                  # no yarn mscale (spec §8.3)
    qn = q_nope.transpose(1, 0, 2)                                               # [H, S, dn]
    qp = q_pe.transpose(1, 0, 2)                                                 # [H, S, dr]

    def expand(k0, k1):
        """Keys k0..k1-1: k_nope [H, dn, n], k_pe [dr, n] and values [H, n, dv]."""
        rows = cache.rows_f32(layer, k0, k1)                                     # [n, R + dr] (bf16 widened per block)
        kv = kernels.matmul(rows[:, :R], w.kv_b_proj).reshape(k1 - k0, H, dn + dv)   # [n, H, dn+dv]
        return kv[..., :dn].transpose(1, 2, 0), rows[:, R:].T, kv[..., dn:].transpose(1, 0, 2)

    def scores(keys, k0, n, q0, q1):
        """Scores [H, q1-q0, n] (scaled, causally masked) of queries q0..q1-1 and the first n keys of a block."""
        kn, kp, _ = keys
        s = np.matmul(qn[:, q0:q1], kn[..., :n])                                 # q_nope·k_nope
        s += np.matmul(qp[:, q0:q1], kp[:, :n])                                  # + q_pe·k_pe (k_pe shared)
        s *= scale
        s[:, np.arange(k0, k0 + n)[None, :] > positions[q0:q1, None]] = -np.inf  # causal mask
        return s

    wants = _wants_probs(layer)
    qb = S if wants else max(1, int(query_block))
    o = np.empty((H, S, dv), dtype=np.float32)
    if N <= key_block or wants:
        keys = expand(0, N)
        for q0 in range(0, S, qb):
            q1 = min(S, q0 + qb)
            n = N if wants else min(N, int(positions[q0:q1].max()) + 1)          # keys this block can see
            p = softmax(scores(keys, 0, n, q0, q1))                              # fp32, [H, q, n]
            if wants:
                p = emit(f"language_model.model.layers.{layer}.self_attn.attn_probs", p)
            o[:, q0:q1] = np.matmul(p, keys[2][:, :n])                           # [H, q, dv]
    else:
        m = np.full((H, S, 1), -np.inf, dtype=np.float32)                        # running max
        l = np.zeros((H, S, 1), dtype=np.float32)                                # running sum of exp
        o[...] = 0.0                                                             # running numerator
        for k0 in range(0, min(N, int(positions.max()) + 1), key_block):         # fully-future blocks skipped
            k1 = min(N, k0 + key_block)
            keys = expand(k0, k1)
            for q0 in range(0, S, qb):
                q1 = min(S, q0 + qb)
                n = min(k1, int(positions[q0:q1].max()) + 1) - k0               # keys of the block it can see
                if n <= 0:
                    continue                                                     # the whole block is its future
                s = scores(keys, k0, n, q0, q1)
                mq = m[:, q0:q1]
                m_new = np.maximum(mq, s.max(axis=-1, keepdims=True))           # finite: key 0 is in block 0
                corr = np.exp(mq - m_new)
                p = np.exp(s - m_new)
                l[:, q0:q1] = l[:, q0:q1] * corr + p.sum(axis=-1, keepdims=True)
                o[:, q0:q1] = o[:, q0:q1] * corr + np.matmul(p, keys[2][:, :n])
                m[:, q0:q1] = m_new
        o /= l
    o = o.transpose(1, 0, 2).reshape(S, H * dv)                                  # [S, H*dv]
    return kernels.matmul(o, w.o_proj)                                           # [S, D]


# ---------------------------------------------------------------------------------------------------------
# Absorbed form (decode)
# ---------------------------------------------------------------------------------------------------------
def absorbed_kv_b(w: MLAWeights, cfg):
    """Split kv_b_proj [H*(dn+dv), R] into W_uk [H, dn, R] and W_uv [H, dv, R] (f32 views of one widening)."""
    H, dn, dv, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    kvb = w.kv_b_f32 if w.kv_b_f32 is not None else f32_of(w.kv_b_proj)
    kvb = kvb.reshape(H, dn + dv, R)
    return kvb[:, :dn, :], kvb[:, dn:, :]


# Names the fused decode cannot report (its q_pe rotation and probabilities stay inside the kernel): a trace
# that records or edits one of them for a layer runs that layer's decode step by step (same values up to float
# rounding, tests/test_trace.py); every other name keeps the fused path.
FUSED_DECODE_HIDES = ("q_rope", "k_rope", "attn_probs")


@lru_cache(maxsize=None)
def _hidden_names(layer: int) -> tuple:
    return tuple(f"language_model.model.layers.{layer}.self_attn.{n}" for n in FUSED_DECODE_HIDES)


def mla_decode(x: np.ndarray, w: MLAWeights, cache, layer: int, positions, cfg) -> np.ndarray:
    """MLA for new tokens ``x`` [S, D] (usually S = 1) in the absorbed form over the latent cache.

    q_lat[h] = q_nope[h] · W_uk[h]             (H × R: the query mapped into latent space)
    score[h, n] = (q_lat[h]·c_n + q_pe[h]·k_pe_n) · qk_head_dim^-0.5, causal softmax
    o[h] = W_uv[h] · Σ_n p[h, n] c_n           then o_proj.
    Equal to :func:`mla_prefill` up to float rounding (spec §8.3, "weight absorption").
    One token on a stored kv_b_proj: the projections, then :func:`mla_absorbed_out` (the attention and o_proj;
    through its fast twin: one C call). Otherwise (several tokens, an f32 kv_b copy in ``w.kv_b_f32``, or a trace
    asking for one of FUSED_DECODE_HIDES) step by step below, the absorbed products on kv_b_proj's stored form through
    kernels.heads_vecmat / heads_matvec (all heads in one call).
    """
    positions = np.asarray(positions)
    S = x.shape[0]
    H, dn, dr, dv, R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                        cfg.kv_lora_rank)
    if S == 1 and w.kv_b_f32 is None and not (trace.active() and trace.wants(*_hidden_names(layer))):
        # the two input projections in one kernel call, the whole absorbed attention in another: the step by
        # step form is ~15 NumPy calls per layer and token around the kernels, more than its arithmetic
        if cfg.q_lora_rank:
            qa, kva = kernels.matmul_many([x, x], [w.q_a_proj, w.kv_a_proj_with_mqa])
            q = kernels.matmul(kernels.fast(rms_norm)(qa, w.q_a_layernorm, cfg.kv_a_layernorm_eps), w.q_b_proj)
        else:
            q, kva = kernels.matmul_many([x, x], [w.q_proj, w.kv_a_proj_with_mqa])   # [1, H*(dn+dr)], [1, R+dr]
        rows, n = cache.next_row(layer)
        y = kernels.fast(mla_absorbed_out)(q, kva, w.kv_a_layernorm, cfg.kv_a_layernorm_eps,
                                           _inv_freq(dr, float(cfg.rope_theta)), int(positions.reshape(-1)[-1]),
                                           rows, n, w.kv_b_proj, w.o_proj, cfg.qk_head_dim ** -0.5,
                                           (H, dn, dr, dv, R))
        cache.commit(layer)                                                      # rows[n] was written
        return y[None, :]                                                        # [1, D]
    q_nope, q_pe, c, k_pe = mla_project(x, w, positions, cfg, layer)
    cache.write(layer, c, k_pe)
    rows = cache.rows_f32(layer)                                                 # [N, R + dr]  = [c | k_pe]
    N = rows.shape[0]

    if w.kv_b_f32 is not None:
        w_uk, w_uv = absorbed_kv_b(w, cfg)                                       # [H, dn, R], [H, dv, R]
        q_lat = np.matmul(q_nope.transpose(1, 0, 2), w_uk)                       # [H, S, R]
    else:  # per head h, W_uk[h] = kv_b_proj rows [h*(dn+dv), h*(dn+dv) + dn), read in the stored form
        q_lat = np.stack([kernels.heads_vecmat(q_nope[t], w.kv_b_proj, 0, dn + dv, dn) for t in range(S)],
                         axis=1)                                                 # [H, S, R]
    q_cat = np.concatenate([q_lat, q_pe.transpose(1, 0, 2)], axis=-1)           # [H, S, R + dr]
    s = np.matmul(q_cat, rows.T)                                                 # [H, S, N]
    s *= np.float32(cfg.qk_head_dim ** -0.5)
    if S > 1 or positions[-1] < N - 1:
        s[:, _causal_mask(positions, N)] = -np.inf
    p = softmax(s)                                                               # [H, S, N]
    if _wants_probs(layer):
        p = emit(f"language_model.model.layers.{layer}.self_attn.attn_probs", p)
    o_lat = np.matmul(p, rows[:, :R])                                            # [H, S, R]
    if w.kv_b_f32 is not None:
        o = np.matmul(o_lat, w_uv.transpose(0, 2, 1))                            # [H, S, dv]
    else:  # W_uv[h] = rows [h*(dn+dv) + dn, (h+1)*(dn+dv))
        o = np.stack([kernels.heads_matvec(o_lat[:, t], w.kv_b_proj, dn, dn + dv, dv) for t in range(S)],
                     axis=1)                                                     # [H, S, dv]
    o = o.transpose(1, 0, 2).reshape(S, H * dv)                                  # [S, H*dv]
    return kernels.matmul(o, w.o_proj)                                           # [S, D]


def mla_absorbed(q, kva, ln, eps: float, inv_freq, pos: int, rows: np.ndarray, n: int, kv_b, scale: float,
                 dims, matmul=None) -> np.ndarray:
    """The absorbed MLA attention of ONE decode token from its projections (spec §8.3)   -> f32[H * dv].

    q [H * (dn + dr)] (q_pe not rotated yet), kva [R + dr] (kv_a_proj_with_mqa output), ln / eps:
    kv_a_layernorm, inv_freq [dr / 2] (angles pos · inv_freq), rows: the layer's cache buffer [>= n + 1, R + dr]
    with n rows held -- row n is written here ([RMSNorm(c) | RoPE(k_pe)]); float32, or uint16 for a bf16 cache:
    then row n is rounded to nearest even (weights.f32_to_bf16) and the keys are the widened rows, the new
    one included, as the C kernel reads them; kv_b: kv_b_proj [H * (dn + dv), R]
    in any stored form; dims = (H, dn, dr, dv, R). The W_uv products go through ``matmul`` (default
    kernels.matmul; tests pass kernels.reference). Fast twin: kernels/fused.py (one C call, one pass over the
    cache with an online softmax, its rows split between the threads; W_uk / W_uv read in the stored form)."""
    H, dn, dr, dv, R = (int(d) for d in dims)
    check_absorbed(q, kva, rows, n, pos, kv_b, dims)
    mm = kernels.matmul if matmul is None else matmul
    q = np.asarray(q, dtype=np.float32).reshape(H, dn + dr)
    kva = np.asarray(kva, dtype=np.float32).reshape(-1)
    ang = (np.float32(pos) * np.asarray(inv_freq, dtype=np.float32))[None, :]              # [1, dr/2]
    new = np.concatenate([rms_norm(kva[:R], ln, eps),                                        # c, eps 1e-6
                          apply_rope(kva[None, R:], ang)[0]])                                # k_pe
    if rows.dtype == np.uint16:                                                              # bf16 cache
        rows[n] = f32_to_bf16(new)
        keys = bf16_to_f32(rows[:min(n + 1, pos + 1)])                                       # [N, R+dr] causal
    else:
        rows[n] = new
        keys = rows[:min(n + 1, pos + 1)]                                                    # [N, R+dr] causal
    o = np.empty((H, dv), dtype=np.float32)
    for h in range(H):
        r0 = h * (dn + dv)
        q_lat = vecmat(q[h, :dn], rows_of(kv_b, r0, r0 + dn))                          # [R]  q_nope·W_uk
        q_pe = apply_rope(q[h, dn:][None, :], ang)[0]                                        # [dr]
        p = softmax((keys @ np.concatenate([q_lat, q_pe])) * np.float32(scale))             # [N]
        o[h] = mm((p @ keys[:, :R])[None, :], rows_of(kv_b, r0 + dn, r0 + dn + dv))[0]  # [dv] W_uv·o_lat
    return o.reshape(-1)


def mla_absorbed_out(q, kva, ln, eps: float, inv_freq, pos: int, rows: np.ndarray, n: int, kv_b, o_proj,
                     scale: float, dims, matmul=None) -> np.ndarray:
    """:func:`mla_absorbed`, then o_proj: one decode token's attention output (spec §8.3)   -> f32[D].

    o_proj: [D, H * dv] in any stored form; the other arguments as mla_absorbed (writes rows[n]). Fast twin:
    kernels/fused.py (pk_mla_absorbed_o: the attention and o_proj in ONE C call and one parallel region --
    the separate o_proj GEMV was one more Python call and thread fork/join per layer and token)."""
    mm = kernels.matmul if matmul is None else matmul
    check_out_proj(o_proj, dims)
    o = mla_absorbed(q, kva, ln, eps, inv_freq, pos, rows, n, kv_b, scale, dims, matmul)   # [H * dv]
    return mm(o[None, :], o_proj)[0]                                                     # [D]


def check_out_proj(o_proj, dims) -> None:
    """One-line ValueError unless o_proj is [D, H * dv] for dims = (H, dn, dr, dv, R)."""
    H, dv = int(dims[0]), int(dims[3])
    if len(o_proj.shape) != 2 or int(o_proj.shape[1]) != H * dv:
        raise ValueError(f"mla_absorbed_out: o_proj is {list(o_proj.shape)}, expected [D, {H * dv}] "
                         f"(heads={H} x dv={dv})")


def check_absorbed(q, kva, rows, n: int, pos: int, kv_b, dims) -> None:
    """One-line ValueError unless mla_absorbed's arguments fit dims = (H, dn, dr, dv, R) and the cache row n."""
    H, dn, dr, dv, R = map(int, dims)
    qs, ks = int(np.size(q)), int(np.size(kva))
    if qs != H * (dn + dr) or ks != R + dr or tuple(kv_b.shape) != (H * (dn + dv), R):
        raise ValueError(f"mla_absorbed: q [{qs}], kva [{ks}], kv_b {list(kv_b.shape)} do not fit "
                         f"heads={H}, dn={dn}, dr={dr}, dv={dv}, R={R}")
    if rows.ndim != 2 or rows.shape[1] != R + dr or not 0 <= n < rows.shape[0] or pos < 0:
        raise ValueError(f"mla_absorbed: cache rows {list(rows.shape)} cannot take row {n} of width {R + dr} "
                         f"(position {pos})")
    if rows.dtype not in (np.float32, np.uint16):
        raise ValueError(f"mla_absorbed: cache rows are {rows.dtype}, expected float32 or bf16 bits (uint16)")
