"""MoonViT vision tower and the multi-modal projector (spec §6-7), in NumPy float32.

Stages, each a pure function with its weights as arguments (shapes on the line):

    patch_embed        f32[L,3,p,p] -> f32[L,C]             one matmul over flattened (C, ky, kx) patches
    bicubic_resize     f32[H0,W0,C] -> f32[gh*gw,C]         torch bicubic, A=-0.75, align_corners=False
    vision_block       f32[L,C] -> f32[L,C]                 LN, qkv, 2-D RoPE, block-diagonal attention, MLP
    patch_merger       f32[L,C] -> f32[T,4,C]               2x2, sub-tokens TL, TR, BL, BR
    projector          f32[T,4,C] -> f32[T,text_hidden]     per-sub-vector LN, linear_1, erf GELU, linear_2

:class:`VisionTower` strings them together, reading one block's weights at a time from the memory-mapped
checkpoint, and emits every stage through :mod:`pykimi.trace` under the checkpoint's module names.
L = total patches of all images (packed), T = L / 4 merged tokens, C = vision hidden, p = patch size.
"""
from __future__ import annotations

import math
import threading
from typing import Sequence

import numpy as np

from .errors import CheckpointError, InputError
# the shared primitives (LayerNorm and GELU of §6.3 / §7, RoPE of §6.4) are defined once, in pykimi.ops; the
# names stay importable from here (tutorial 05 imports pykimi.vision.layer_norm, gelu_tanh, gelu_erf)
from .ops import apply_rope, erf, erfc, exp_rows, gelu_erf, gelu_tanh, layer_norm  # noqa: F401
from .rope import vision_rope_angles

from . import kernels
from . import progress
from . import trace  # a callable module: trace.emit here, pykimi.trace(model) for users

VT = "vision_tower"
PROJ = "multi_modal_projector"

# the short names of one block's tensors, under f"vision_tower.encoder.blocks.{i}."
BLOCK_KEYS = ("norm0.weight", "norm0.bias", "wqkv.weight", "wqkv.bias", "wo.weight", "wo.bias",
              "norm1.weight", "norm1.bias", "mlp.fc0.weight", "mlp.fc0.bias", "mlp.fc1.weight", "mlp.fc1.bias")
# ... of which the four matrices: float32 arrays (multiplied by NumPy in row chunks) or stored weights (bf16 as
# mapped: kernels.matmul, one call per matrix and MM_ROWS rows -- see vision_block)
MATRIX_KEYS = ("wqkv.weight", "wo.weight", "mlp.fc0.weight", "mlp.fc1.weight")
PROJ_KEYS = ("pre_norm.weight", "pre_norm.bias", "linear_1.weight", "linear_1.bias",
             "linear_2.weight", "linear_2.bias")

# scores of one query block for all heads stay below this many bytes (spec: peak < 1 GiB at 16,384 patches)
ATTN_BLOCK_BYTES = 128 << 20
# one worker's score tile [block_q, n] (1 MB: it stays in L2 from the q.k^T sgemm through exp to P.V)
ATTN_TILE_BYTES = 1 << 20
# ... but never fewer query rows than this: past ~4,000 patches 1 MB is a thin tile (16 rows at 16,384), and
# each tile streams all of K and V again ([n, D] each, 4.7 MB at 16,384 x 72). Measured, 16,384 patches x 2 heads
# of 72, 2 threads: 16 rows 10.6-11.3 s, 64 6.3 s, 256 5.1 s, 1024 6.7 s. 256 rows x 16,384 x 4 B = 16 MiB a
# worker, still far below ATTN_BLOCK_BYTES (and a full [16, n, n] score matrix, 16 GiB).
ATTN_MIN_ROWS = 256
# rows of x per worker task in the row-local parts of a block (LN, qkv, RoPE, wo, MLP): big enough that
# single-threaded sgemm runs near full speed, small enough to share out (4 tasks per 448 px image; the
# measurements are in bench/RESULTS.md, "Measurements behind the code").
ROW_CHUNK = 256
# rows of x per product when the block's matrices are stored weights (vision_block: kernels.matmul): the [rows, 4304]
# MLP activations and the kernel's packed copy of x stay ~18 MB each however big the image (a 16,384-patch image
# whole was ~280 MB each); at 1024 rows the kernel runs at its full speed.
MM_ROWS = 1024


# ---------------------------------------------------------------------------------------------------------
# patch embedding and the position table
# ---------------------------------------------------------------------------------------------------------
def patch_embed(pixel_values: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Conv2d(3 -> C, kernel p, stride p) on each patch = flatten (C, ky, kx) and one matmul (spec §6.1).

    pixel_values f32[L,3,p,p], w f32[C,3,p,p], b f32[C] -> f32[L,C]."""
    L = pixel_values.shape[0]
    C = w.shape[0]
    x = np.ascontiguousarray(pixel_values, dtype=np.float32).reshape(L, w[0].size)   # [L, 3*p*p]
    out = kernels.matmul(x, w.reshape(C, -1))                                 # [L, C]
    out += b
    return out


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """Torch's cubic-convolution weights of the taps floor-1 .. floor+2 at fraction t, A = -0.75,
    evaluated in float32 like torch's get_cubic_upsample_coefficients   # f32[n, 4]."""
    A = np.float32(-0.75)
    one = np.float32(1.0)

    def near(x):   # |x| <= 1: ((A+2)x - (A+3)) x^2 + 1
        return ((A + np.float32(2)) * x - (A + np.float32(3))) * x * x + one

    def far(x):    # 1 < |x| < 2: ((A x - 5A) x + 8A) x - 4A
        return ((A * x - np.float32(5) * A) * x + np.float32(8) * A) * x - np.float32(4) * A

    t = t.astype(np.float32)
    s = one - t
    return np.stack([far(t + one), near(t), near(s), far(s + one)], axis=-1).astype(np.float32)


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """The 1-D resampling matrix of torch bicubic (align_corners=False, antialias=False)   # f32[out, in].

    Row o holds the weights of output o: src = (in/out)*(o+0.5) - 0.5 (scale computed in float32 as torch does;
    the coordinate itself is not clamped), taps floor(src)-1 .. floor(src)+2 with their *indices* clamped to
    [0, in-1] (so edge taps accumulate), cubic convolution with A = -0.75 (spec §6.2). Equal sizes give the
    identity exactly."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic_matrix: sizes must be >= 1, got in={in_size}, out={out_size}")
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = scale * (dst + np.float32(0.5)) - np.float32(0.5)             # [out] float32
    base = np.floor(src)
    t = np.clip(src - base, 0.0, 1.0).astype(np.float32)
    wts = _cubic_weights(t)                                               # [out, 4]
    idx = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]    # [out, 4]
    idx = np.clip(idx, 0, in_size - 1)
    m = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), 4), idx.reshape(-1)), wts.reshape(-1).astype(np.float64))
    return m.astype(np.float32)


def bicubic_resize(table: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """F.interpolate(table.permute(2,0,1)[None], size=(out_h,out_w), mode='bicubic') flattened row-major.

    table f32[H0,W0,C] -> f32[out_h*out_w, C]. Separable: rows with bicubic_matrix(H0,out_h), then columns.
    Always applied, including at equal size, where it is the identity (spec §6.2, HF's size test never hits)."""
    H0, W0, C = table.shape
    mh = bicubic_matrix(H0, out_h).astype(np.float64)                    # [oh, H0]
    mw = bicubic_matrix(W0, out_w).astype(np.float64)                    # [ow, W0]
    t = np.asarray(table, dtype=np.float64).reshape(H0, W0 * C)
    rows = (mh @ t).reshape(out_h, W0, C)                                # [oh, W0, C]   along H
    cols = mw @ rows.transpose(1, 0, 2).reshape(W0, out_h * C)          # [ow, oh*C]    along W
    out = cols.reshape(out_w, out_h, C).transpose(1, 0, 2)               # [oh, ow, C]
    return np.ascontiguousarray(out, dtype=np.float32).reshape(out_h * out_w, C)


# ---------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------
def cu_seqlens(grid_hws) -> np.ndarray:
    """Cumulative patch counts [0, n_0, n_0+n_1, ...]: image k owns rows cu[k]:cu[k+1]   # int64[n_img+1]."""
    g = np.asarray(grid_hws, dtype=np.int64).reshape(-1, 2)
    return np.concatenate([[0], np.cumsum(g[:, 0] * g[:, 1])]).astype(np.int64)


def rope_angles(grid_hws, head_dim: int, theta: float = 10000.0) -> list[np.ndarray]:
    """The 2-D RoPE angle table of every image (positions restart at (0,0) per image)   # [f32[n_k, D/2]].

    Pair 2i turns by col*f_i, pair 2i+1 by row*f_i, f_i = theta^(-4i/D) (spec §6.4; pykimi.rope)."""
    return [vision_rope_angles(int(gh), int(gw), head_dim, theta)
            for gh, gw in np.asarray(grid_hws, dtype=np.int64).reshape(-1, 2)]


def vision_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cu: Sequence[int], block_q: int | None = None,
                     return_probs: bool = False):
    """Bidirectional attention restricted to each image's own tokens (block-diagonal over cu_seqlens).

    q, k, v f32[L,H,D] (q, k already rotated; any strides with a unit last axis) -> f32[L, H*D]; with
    return_probs also f32[H,L,L] (zero across images). Scores (q/sqrt(D)).k^T and the softmax are fp32; the
    softmax is normalised after P.V (D << n): ops.exp_rows, through kernels.fast (two passes a tile in C). One
    task per (image, head), shared out to the worker threads (kernels.parallel_for, BLAS single-threaded
    inside); each copies its head's keys and values out, walks its queries in tiles of ``block_q`` rows (default:
    a tile of ATTN_TILE_BYTES but at least ATTN_MIN_ROWS rows, all threads together under ATTN_BLOCK_BYTES) and
    never holds more than one [block_q, n] score tile: a 16,384-patch image never builds an n x n matrix per head
    (16 MiB a worker instead of 16 GiB)."""
    L, H, D = q.shape
    if return_probs:
        return _vision_attention_probs(q, k, v, cu, block_q)
    scale = np.float32(1.0 / math.sqrt(D))
    out = np.empty((L, H, D), dtype=np.float32)
    cu = [int(c) for c in cu]
    nt = kernels.get_threads()
    tasks = [(s, e, h) for s, e in zip(cu[:-1], cu[1:]) if e > s for h in range(H)]
    bufs = {}
    softmax_rows = kernels.fast(exp_rows)

    def task(t):
        s, e, h = t
        n = e - s
        cap = max(1, ATTN_BLOCK_BYTES // max(1, nt) // (4 * n))          # rows all workers together may hold
        bq = max(1, min(n, block_q or min(cap, max(ATTN_MIN_ROWS, ATTN_TILE_BYTES // (4 * n)))))
        key = (threading.get_ident(), bq, n)
        buf = bufs.get(key)
        if buf is None:
            buf = bufs[key] = np.empty((bq, n), dtype=np.float32)         # this worker's score tile
        # this head's keys and values copied out of the [n, H, D] rows (288 bytes each, 4.6 KB apart at 16 heads):
        # 2 x n x D floats once per task against every tile's two products reading them strided (4096 patches,
        # Intel Ice Lake, 2 threads: 616 -> 559 ms a block's attention)
        kT = np.ascontiguousarray(k[s:e, h].T)                            # [D, n]
        vh = np.ascontiguousarray(v[s:e, h])                              # [n, D]
        for a in range(0, n, bq):
            z = min(n, a + bq)
            sc = np.matmul(q[s + a:s + z, h] * scale, kT, out=buf[:z - a])  # [b, n] fp32 scores
            den = softmax_rows(sc)                                        # sc = exp(sc - max), [b, 1] sums
            o = out[s + a:s + z, h]                                       # [b, D] rows of the output
            np.matmul(sc, vh, out=o)
            o /= den

    kernels.parallel_for(task, tasks)
    return out.reshape(L, H * D)


def _vision_attention_probs(q, k, v, cu, block_q=None):
    """vision_attention that also returns the probabilities f32[H, L, L] (tracing only: O(L^2) memory)."""
    L, H, D = q.shape
    scale = np.float32(1.0 / math.sqrt(D))
    out = np.empty((L, H, D), dtype=np.float32)
    probs = np.zeros((H, L, L), dtype=np.float32)
    for s, e in zip(cu[:-1], cu[1:]):
        s, e = int(s), int(e)
        n = e - s
        if n == 0:
            continue
        qh = np.ascontiguousarray(q[s:e].transpose(1, 0, 2)) * scale      # [H, n, D]
        khT = k[s:e].transpose(1, 2, 0)                                   # [H, D, n]
        vh = np.ascontiguousarray(v[s:e].transpose(1, 0, 2))             # [H, n, D]
        bq = min(n, block_q or max(1, ATTN_BLOCK_BYTES // (4 * H * n)))
        for a in range(0, n, bq):
            z = min(n, a + bq)
            sc = np.matmul(qh[:, a:z], khT)                               # [H, b, n]
            sc -= sc.max(axis=-1, keepdims=True)
            np.exp(sc, out=sc)
            sc /= sc.sum(axis=-1, keepdims=True)
            probs[:, s + a:s + z, s:e] = sc
            out[s + a:s + z] = np.matmul(sc, vh).transpose(1, 0, 2)
    return out.reshape(L, H * D), probs


def _wants_attn_probs(name: str) -> bool:
    return any(t.wants_attn_probs(name) for t in trace._ACTIVE)


# ---------------------------------------------------------------------------------------------------------
# the block, the merger, the projector
# ---------------------------------------------------------------------------------------------------------
def _vcfg(cfg):
    return getattr(cfg, "vision", cfg)      # accept KimiVLConfig or VisionConfig


def _row_chunks(L: int, start: int = 0) -> list:
    """[(r0, r1)] row ranges of ROW_CHUNK rows from start to L. Independent of the thread count on purpose: sgemm's
    rounding can depend on the number of rows it is given, and the result must not depend on --threads."""
    return [(r0, min(L, r0 + ROW_CHUNK)) for r0 in range(start, L, ROW_CHUNK)]


def _block_setup(x, angles, cfg):
    """vision_block's shapes and inputs: (x f32, L, C, H, D, eps, RoPE angles [L, D/2], the row chunks)."""
    vc = _vcfg(cfg)
    L, C = x.shape
    H = vc.num_attention_heads
    ang = np.concatenate(angles, axis=0) if isinstance(angles, (list, tuple)) else angles
    return (np.asarray(x, dtype=np.float32), L, C, H, C // H, getattr(vc, "layer_norm_eps", 1e-5), ang,
            _row_chunks(L))


def _block_attention(q, k, v, grid_hws, name, block_q):
    """vision_block's attention of the rotated q, k and v [L, H, D] -> [L, C], with its trace names (q_rope,
    k_rope, and attn_probs [H, L, L], 0 across images, when a trace asks)."""
    if name is not None:
        q = trace.emit(name + ".q_rope", q)
        k = trace.emit(name + ".k_rope", k)
    cu = cu_seqlens(grid_hws)
    if name is not None and trace.active() and _wants_attn_probs(name):
        att, probs = vision_attention(q, k, v, cu, block_q=block_q, return_probs=True)
        trace.emit(name + ".attn_probs", probs)
        return att
    return vision_attention(q, k, v, cu, block_q=block_q)


def vision_block(x: np.ndarray, w: dict, grid_hws, angles, cfg, name: str | None = None,
                 block_q: int | None = None) -> np.ndarray:
    """One pre-norm MoonViT block (spec §6.3)   f32[L,C] -> f32[L,C] (a new array; x is not modified).

        x1 = x + wo(attn(rope(q), rope(k), v))     q | k | v = wqkv(LN0(x))   (contiguous thirds)
        out = x1 + fc1(gelu_tanh(fc0(LN1(x1))))

    w: the block's tensors keyed by their short checkpoint names (BLOCK_KEYS): float32 arrays, or for the four
    matrices (MATRIX_KEYS) stored weights as the checkpoint maps them (pykimi.weights.Stored, bf16), which go to
    kernels.matmul -- one call per matrix and MM_ROWS rows, the C kernels multiplying the bf16 weights in place
    (the exact f32 product) at the AVX-512 level's ~430 GFLOP/s on 2 Zen 5 cores, where NumPy's sgemm on the widened
    weights ran ~200 (OpenBLAS's AVX2 kernels on that CPU) and the widening cost a pass over the weights more;
    angles: per-image RoPE angle tables (rope_angles) or one concatenated f32[L, D/2]; cfg: Kimi-VL or vision
    config; name: the trace prefix (``vision_tower.encoder.blocks.{i}``) for the optional q/k/probs captures.

    Everything but the attention is row-local, so it runs in chunks of ROW_CHUNK tokens, one worker task each
    (kernels.parallel_for: single-threaded sgemm + the elementwise ops while the chunk is in cache; with stored
    matrices only the elementwise ops, between the MM_ROWS-row products); the attention runs one task per
    (image, head). Same operations, in the same order, as the whole-array form."""
    if not all(isinstance(w[k], np.ndarray) for k in MATRIX_KEYS):
        return _vision_block_stored(x, w, grid_hws, angles, cfg, name, block_q)
    x, L, C, H, D, eps, ang, chunks = _block_setup(x, angles, cfg)
    fast_gelu = kernels.fast(gelu_tanh)

    qkv = np.empty((L, 3 * C), dtype=np.float32)                         # q | k | v contiguous thirds
    q = np.empty((L, H, D), dtype=np.float32)
    k = np.empty((L, H, D), dtype=np.float32)

    def front(rc):
        r0, r1 = rc
        h = layer_norm(x[r0:r1], w["norm0.weight"], w["norm0.bias"], eps)                 # [r, C]
        t = np.matmul(h, w["wqkv.weight"].T, out=qkv[r0:r1])                              # [r, 3C]
        t += w["wqkv.bias"]
        a = ang[r0:r1, None, :]
        q[r0:r1] = apply_rope(t[:, :C].reshape(-1, H, D), a)          # pair 2i col, 2i+1 row (§6.4)
        k[r0:r1] = apply_rope(t[:, C:2 * C].reshape(-1, H, D), a)

    kernels.parallel_for(front, chunks)
    v = qkv[:, 2 * C:].reshape(L, H, D)                                  # [L, H, D] view
    att = _block_attention(q, k, v, grid_hws, name, block_q)           # [L, C]

    out = np.empty((L, C), dtype=np.float32)

    def back(rc):
        r0, r1 = rc
        o = att[r0:r1] @ w["wo.weight"].T                                  # [r, C]
        o += w["wo.bias"]
        x1 = np.add(x[r0:r1], o, out=out[r0:r1])                           # residual 1
        h = layer_norm(x1, w["norm1.weight"], w["norm1.bias"], eps)
        f = h @ w["mlp.fc0.weight"].T                                      # [r, F]
        f += w["mlp.fc0.bias"]
        f = fast_gelu(f)                                                   # ops.gelu_tanh (C twin on C)
        o = f @ w["mlp.fc1.weight"].T                                      # [r, C]
        o += w["mlp.fc1.bias"]
        x1 += o                                                            # residual 2

    kernels.parallel_for(back, chunks)
    return out


def _vision_block_stored(x, w, grid_hws, angles, cfg, name, block_q) -> np.ndarray:
    """vision_block with its matrices as stored weights: each product a kernels.matmul over MM_ROWS rows at a time
    (on the kernels' threads), the row-local rest in ROW_CHUNK tasks between them. Per element the operations of
    vision_block's f32 form, but each product's sum is the kernel's (the exact f32 product of the bf16 weights,
    summed in its own order: ~1e-6 of the scale from NumPy's sgemm)."""
    x, L, C, H, D, eps, ang, _ = _block_setup(x, angles, cfg)
    fast_gelu = kernels.fast(gelu_tanh)                                  # ops.gelu_tanh (C twin on C)
    qkv = np.empty((L, 3 * C), dtype=np.float32)                         # q | k | v contiguous thirds
    q = np.empty((L, H, D), dtype=np.float32)
    k = np.empty((L, H, D), dtype=np.float32)
    spans = [(b0, min(L, b0 + MM_ROWS)) for b0 in range(0, L, MM_ROWS)]
    for b0, b1 in spans:
        h = np.empty((b1 - b0, C), dtype=np.float32)
        sub = _row_chunks(b1, b0)

        def norm0(rc):
            h[rc[0] - b0:rc[1] - b0] = layer_norm(x[rc[0]:rc[1]], w["norm0.weight"], w["norm0.bias"], eps)

        kernels.parallel_for(norm0, sub)
        qkv[b0:b1] = kernels.matmul(h, w["wqkv.weight"], exact=True)      # [rows, 3C]

        def rope(rc):
            r0, r1 = rc
            t = qkv[r0:r1]
            t += w["wqkv.bias"]
            a = ang[r0:r1, None, :]
            q[r0:r1] = apply_rope(t[:, :C].reshape(-1, H, D), a)
            k[r0:r1] = apply_rope(t[:, C:2 * C].reshape(-1, H, D), a)

        kernels.parallel_for(rope, sub)
    v = qkv[:, 2 * C:].reshape(L, H, D)
    att = _block_attention(q, k, v, grid_hws, name, block_q)           # [L, C]
    out = np.empty((L, C), dtype=np.float32)
    for b0, b1 in spans:
        sub = _row_chunks(b1, b0)
        o = kernels.matmul(att[b0:b1], w["wo.weight"], exact=True)      # [rows, C]
        h = np.empty((b1 - b0, C), dtype=np.float32)

        def norm1(rc):
            r0, r1 = rc[0] - b0, rc[1] - b0
            o[r0:r1] += w["wo.bias"]
            x1 = np.add(x[rc[0]:rc[1]], o[r0:r1], out=out[rc[0]:rc[1]])   # residual 1
            h[r0:r1] = layer_norm(x1, w["norm1.weight"], w["norm1.bias"], eps)

        kernels.parallel_for(norm1, sub)
        f = kernels.matmul(h, w["mlp.fc0.weight"], exact=True)          # [rows, F]

        def gelu(rc):
            r0, r1 = rc[0] - b0, rc[1] - b0
            f[r0:r1] += w["mlp.fc0.bias"]
            f[r0:r1] = fast_gelu(f[r0:r1])

        kernels.parallel_for(gelu, sub)
        o = kernels.matmul(f, w["mlp.fc1.weight"], exact=True)          # [rows, C]

        def residual(rc):
            r0, r1 = rc[0] - b0, rc[1] - b0
            o[r0:r1] += w["mlp.fc1.bias"]
            out[rc[0]:rc[1]] += o[r0:r1]                                  # residual 2

        kernels.parallel_for(residual, sub)
    return out


def patch_merger(x: np.ndarray, grid_hws, merge=(2, 2)) -> np.ndarray:
    """2x2 merge per image (spec §6.6)   f32[L,C] -> f32[T,kh*kw,C].

    Image (gh, gw): view (gh/kh, kh, gw/kw, kw, C) -> (gh/kh, gw/kw, kh, kw, C): sub-tokens TL, TR, BL, BR,
    merged tokens in raster order of the merged grid; images concatenated in order."""
    kh, kw = merge
    C = x.shape[-1]
    outs = []
    cu = cu_seqlens(grid_hws)
    for (gh, gw), s, e in zip(np.asarray(grid_hws, dtype=np.int64).reshape(-1, 2), cu[:-1], cu[1:]):
        gh, gw = int(gh), int(gw)
        xi = x[s:e].reshape(gh // kh, kh, gw // kw, kw, C).transpose(0, 2, 1, 3, 4)
        outs.append(xi.reshape(-1, kh * kw, C))
    if not outs:
        return np.zeros((0, kh * kw, C), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(outs, axis=0), dtype=np.float32)


def projector(merged: np.ndarray, w: dict, eps: float = 1e-5) -> np.ndarray:
    """KimiVLMultiModalProjector (spec §7)   f32[T,4,C] -> f32[T,text_hidden].

    w keyed by short names (PROJ_KEYS). LayerNorm on each C-sub-vector *before* the concat to 4C, then
    linear_1, exact erf GELU (not tanh), linear_2. Emits pre_norm, linear_1 and the output."""
    T, S, C = merged.shape
    h = layer_norm(merged, w["pre_norm.weight"], w["pre_norm.bias"], eps)  # [T, 4, C]
    h = trace.emit(f"{PROJ}.pre_norm", h)
    h = h.reshape(T, S * C)                                                 # [T, 4C] TL|TR|BL|BR
    h = kernels.matmul(h, w["linear_1.weight"], exact=True)                 # stored or f32: C, or row tiles
    h += w["linear_1.bias"]
    h = trace.emit(f"{PROJ}.linear_1", h)                                  # [T, 4C] before the GELU
    g = np.empty(h.shape, dtype=np.float32)

    def gelu_rows(rc):                                                      # float64 erf: the costly part
        g[rc[0]:rc[1]] = gelu_erf(h[rc[0]:rc[1]])

    kernels.parallel_for(gelu_rows, _row_chunks(T))
    out = kernels.matmul(g, w["linear_2.weight"], exact=True)               # [T, text_hidden]
    out += w["linear_2.bias"]
    return trace.emit(PROJ, out)


# ---------------------------------------------------------------------------------------------------------
# the tower
# ---------------------------------------------------------------------------------------------------------
def _stored_products() -> bool:
    """Whether the tower hands its matrices to kernels.matmul as mapped: where a C kernel multiplies bf16 batches
    of MM_ROWS rows in place (the AVX-512 level; AMX takes bf16 batches only up to C_AMX_ROWS). Elsewhere the C
    backend would widen row tiles for sgemm per call, which ran a 448 px image 9 % slower (AVX2 level, Zen 5)
    than NumPy's products on the block's matrices widened once."""
    from .kernels import linear
    return kernels.backend() == "c" and linear.plan("bf16", MM_ROWS)[0] == "c"


def _expected_shapes(cfg) -> dict:
    from .layout import projector_tensors, vision_tensors
    return dict(vision_tensors(cfg) + projector_tensors(cfg))


class VisionTower:
    """MoonViT + projector on a checkpoint: ``encode(pixel_values, image_grid_hws) -> f32[T, text_hidden]``.

    ckpt: a pykimi.weights.Checkpoint (only ``f32(name)`` is needed, plus ``expect`` for the up-front shape
    check when present); cfg: KimiVLConfig. Weights are widened from the memory-mapped file one block at a
    time and dropped after use, unless cache_weights=True keeps them (~1.7 GB for the real tower).
    """

    def __init__(self, ckpt, cfg, cache_weights: bool = False, block_q: int | None = None):
        self.ckpt = ckpt
        self.cfg = cfg
        self.vcfg = cfg.vision
        self.cache_weights = cache_weights
        self.block_q = block_q
        self._cache: dict[str, np.ndarray] = {}
        self._scratch: dict[str, np.ndarray] = {}      # block weights widened per call (no cache_weights)
        self._shapes = _expected_shapes(cfg)
        if hasattr(ckpt, "expect"):
            for name, shape in self._shapes.items():   # a wrong checkpoint fails here, not at block 14
                ckpt.expect(name, shape)

    # -- weights ------------------------------------------------------------------------------------
    def _f32(self, name: str) -> np.ndarray:
        a = self._cache.get(name)
        if a is None:
            a = np.asarray(self.ckpt.f32(name), dtype=np.float32)
            self._check_shape(name, a.shape)
            if self.cache_weights:
                self._cache[name] = a
        return a

    def _check_shape(self, name: str, shape) -> None:
        want = self._shapes.get(name)
        if want is not None and tuple(shape) != tuple(want):
            raise CheckpointError(f"tensor {name!r} has shape {list(shape)}, expected {list(want)}")

    def block_weights(self, i: int) -> dict:
        """Block i's tensors as float32, keyed by the short names (BLOCK_KEYS).

        Without cache_weights, where the C kernels multiply bf16 batches in place (_stored_products) the four
        matrices are the checkpoint's stored tensors as mapped (vision_block multiplies them with kernels.matmul,
        nothing widened); otherwise they are widened
        (kernels.widen: row tiles on the worker threads) into ONE set of scratch arrays that every block reuses
        (~61 MB for the real tower), valid until the next call (fresh arrays per block were slower:
        bench/RESULTS.md, "Measurements behind the code"). The small vectors are always widened."""
        p = f"{VT}.encoder.blocks.{i}."
        if self.cache_weights or not hasattr(self.ckpt, "tensor"):
            return {k: self._f32(p + k) for k in BLOCK_KEYS}
        stored = _stored_products()
        out = {}
        for k in BLOCK_KEYS:
            st = self.ckpt.tensor(p + k)
            self._check_shape(p + k, st.shape)
            if stored and k in MATRIX_KEYS:
                out[k] = st
                continue
            buf = self._scratch.get(k)
            if buf is None or buf.shape != tuple(st.shape):
                buf = self._scratch[k] = np.empty(st.shape, dtype=np.float32)
            out[k] = kernels.widen(st, out=buf)
        return out

    def projector_weights(self) -> dict:
        """The projector's tensors keyed by PROJ_KEYS: float32, but without cache_weights where the C kernels multiply
        bf16 in place (_stored_products) its two matrices as mapped (widening linear_1 alone was ~20 M values an
        image)."""
        stored = _stored_products() and not self.cache_weights and hasattr(self.ckpt, "tensor")
        out = {}
        for k in PROJ_KEYS:
            if stored and k in ("linear_1.weight", "linear_2.weight"):
                st = out[k] = self.ckpt.tensor(f"{PROJ}.{k}")
                self._check_shape(f"{PROJ}.{k}", st.shape)
            else:
                out[k] = self._f32(f"{PROJ}.{k}")
        return out

    def clear_cache(self) -> None:
        self._cache.clear()
        self._scratch.clear()

    # -- inputs -------------------------------------------------------------------------------------
    def check_inputs(self, pixel_values, image_grid_hws):
        """Validate and normalize: returns (f32[L,3,p,p], int64[n_img,2]); one-line InputError otherwise."""
        vc = self.vcfg
        p = vc.patch_size
        kh, kw = vc.merge_kernel_size
        limit = getattr(vc, "rope_max_grid", 512)
        try:
            g = np.asarray(image_grid_hws)
        except Exception:
            raise InputError("image_grid_hws: not an array of (gh, gw) pairs") from None
        if g.size == 0:
            g = g.reshape(0, 2)
        if g.ndim != 2 or g.shape[1] != 2:
            raise InputError(f"image_grid_hws has shape {list(g.shape)}, expected [n_images, 2] (gh, gw)")
        if not (np.issubdtype(g.dtype, np.integer) or (np.issubdtype(g.dtype, np.floating)
                                                         and np.all(np.isfinite(g)) and np.all(g == np.round(g)))):
            raise InputError(f"image_grid_hws has dtype {g.dtype}, expected integers")
        g = g.astype(np.int64)
        for i, (gh, gw) in enumerate(g):
            if gh <= 0 or gw <= 0:
                raise InputError(f"image {i}: grid {gh}x{gw} patches, expected positive sizes")
            if gh % kh or gw % kw:
                raise InputError(f"image {i}: grid {gh}x{gw} patches is not divisible by the "
                                 f"{kh}x{kw} merge kernel")
            if gh >= limit or gw >= limit:
                raise InputError(f"image {i}: grid {gh}x{gw} patches reaches the {limit}x{limit} 2-D RoPE "
                                 f"table limit (at most {limit - 1} patches per side)")
        try:
            pv = np.asarray(pixel_values)
        except Exception:
            raise InputError("pixel_values: not an array") from None
        if not (np.issubdtype(pv.dtype, np.floating) or np.issubdtype(pv.dtype, np.integer)):
            raise InputError(f"image 0: pixel_values has dtype {pv.dtype}, expected float32")
        if pv.ndim != 4:
            raise InputError(f"image 0: pixel_values has shape {list(pv.shape)}, expected [N, 3, {p}, {p}]")
        if pv.shape[1] != 3:
            raise InputError(f"image 0: pixel_values patches have {pv.shape[1]} channels, expected 3 (RGB), "
                             f"shape {list(pv.shape)} vs [N, 3, {p}, {p}]")
        if pv.shape[2:] != (p, p):
            raise InputError(f"image 0: pixel_values patches are {pv.shape[2]}x{pv.shape[3]}, expected the "
                             f"model's patch size {p}x{p}")
        cu = cu_seqlens(g)
        N = pv.shape[0]
        for i in range(len(g)):
            if cu[i + 1] > N:
                raise InputError(f"image {i}: grid {g[i, 0]}x{g[i, 1]} needs patches {cu[i]}..{cu[i + 1] - 1} "
                                 f"but pixel_values has only {N} patches (grids need {cu[-1]})")
        if cu[-1] != N:
            raise InputError(f"image {len(g) - 1}: pixel_values has {N} patches but the {len(g)} grids need "
                             f"{cu[-1]} ({N - cu[-1]} extra after the last image)")
        pv = np.ascontiguousarray(pv, dtype=np.float32)
        for i in range(len(g)):
            if not np.all(np.isfinite(pv[cu[i]:cu[i + 1]])):
                raise InputError(f"image {i}: pixel_values contain NaN or inf")
        return pv, g

    # -- forward ------------------------------------------------------------------------------------
    def embed(self, pixel_values: np.ndarray, grid_hws: np.ndarray) -> np.ndarray:
        """Patch embedding + resized position table = the encoder input   # f32[L,C]."""
        vc = self.vcfg
        x = patch_embed(pixel_values, self._f32(f"{VT}.patch_embed.proj.weight"),
                        self._f32(f"{VT}.patch_embed.proj.bias"))                     # [L, C]
        x = trace.emit(f"{VT}.patch_embed.proj", x)
        table = self._f32(f"{VT}.patch_embed.pos_emb.weight")                          # [H0, W0, C]
        pos = [bicubic_resize(table, int(gh), int(gw)) for gh, gw in grid_hws]        # [n_k, C] each
        pos = np.concatenate(pos, axis=0) if pos else np.zeros((0, vc.hidden_size), np.float32)
        pos = trace.emit(f"{VT}.patch_embed.pos_emb.interpolated", pos)
        return trace.emit(f"{VT}.patch_embed", x + pos)

    def tower(self, pixel_values, image_grid_hws) -> np.ndarray:
        """MoonViT up to the merger   # f32[T, kh*kw, C] (inputs validated)."""
        pv, g = self.check_inputs(pixel_values, image_grid_hws)
        vc = self.vcfg
        x = self.embed(pv, g)                                                          # [L, C]
        angles = np.concatenate(rope_angles(g, vc.head_dim, vc.rope_theta) or
                                [np.zeros((0, vc.head_dim // 2), np.float32)], axis=0)  # [L, D/2]
        angles = trace.emit(f"{VT}.encoder.rope_angles", angles)       # the 2-D RoPE table (extra name)
        with progress.bar(vc.num_hidden_layers, f"vision tower ({x.shape[0]} patches)", unit="block") as pb:
            for i in range(vc.num_hidden_layers):
                name = f"{VT}.encoder.blocks.{i}"
                x = vision_block(x, self.block_weights(i), g, angles, vc, name=name, block_q=self.block_q)
                x = trace.emit(name, x)
                pb.update(1)
        x = layer_norm(x, self._f32(f"{VT}.encoder.final_layernorm.weight"),
                       self._f32(f"{VT}.encoder.final_layernorm.bias"), vc.layer_norm_eps)
        x = trace.emit(f"{VT}.encoder.final_layernorm", x)
        merged = patch_merger(x, g, vc.merge_kernel_size)                               # [T, 4, C]
        return trace.emit(f"{VT}.merger", merged)

    def project(self, merged: np.ndarray) -> np.ndarray:
        return projector(merged, self.projector_weights(), 1e-5)   # pre_norm: LayerNorm(C), torch default eps (spec §7)

    def encode(self, pixel_values, image_grid_hws) -> np.ndarray:
        """All images -> image features   # f32[T, text_hidden], rows in image order (spec §6-7)."""
        return self.project(self.tower(pixel_values, image_grid_hws))

    __call__ = encode
