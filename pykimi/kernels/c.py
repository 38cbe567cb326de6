"""cffi binding of the C kernels (pykimi._ckernels, built from csrc/ by setup.py or
``python -m pykimi.kernels._build``). Importing this module raises ImportError when the extension is absent.

Each wrapper takes NumPy arrays, makes sure they are C-contiguous float32 (x) / stored dtype (W), and hands
raw pointers to C: no copies of W ever (memory-mapped views are read in place).
"""
import os

import numpy as np

# libgomp reads this once, when it loads. Its default (spin ~300k iterations before sleeping) is made for
# dedicated cores; on a small shared machine the spinning thread steals the time slice of the one doing the
# work and a 1 ms GEMV can take 10 ms. A short spin keeps wake-ups fast when the cores are free.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

from .. import _ckernels  # noqa: F401  (ImportError here = no C backend)

ffi = _ckernels.ffi
lib = _ckernels.lib


def _ptr(ctype: str, a: np.ndarray):
    return ffi.from_buffer(ctype, a)


def _prep(x: np.ndarray, w_data: np.ndarray, out: int):
    x = np.ascontiguousarray(x, dtype=np.float32)
    w_data = np.ascontiguousarray(w_data)
    y = np.empty((x.shape[0], out), dtype=np.float32)
    return x, w_data, y


def matmul_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [n, in] @ w.T, w float32 [out, in]."""
    x, w, y = _prep(x, np.asarray(w, dtype=np.float32), w.shape[0])
    lib.pk_matmul_f32(_ptr("float[]", x), x.shape[0], x.shape[1], _ptr("float[]", w), w.shape[0],
                      _ptr("float[]", y))
    return y


def matmul_bf16(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """x [n, in] @ W.T, W given as bf16 bits uint16 [out, in]."""
    x, bits, y = _prep(x, bits, bits.shape[0])
    lib.pk_matmul_bf16(_ptr("float[]", x), x.shape[0], x.shape[1], _ptr("uint16_t[]", bits), bits.shape[0],
                       _ptr("float[]", y))
    return y


def matmul_bf16a(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """x [n, in] @ W.T with x rounded to bf16 (bf16 weights, AVX512_BF16 batches; twin: ref.matmul_act_bf16 where
    the kernel runs -- n >= 8 at the AVX-512 level with get_avx512bf16() and not AMX -- else matmul_bf16's
    exact product)."""
    x, bits, y = _prep(x, bits, bits.shape[0])
    lib.pk_matmul_bf16a(_ptr("float[]", x), x.shape[0], x.shape[1], _ptr("uint16_t[]", bits), bits.shape[0],
                        _ptr("float[]", y))
    return y


def _matmul_blocks(fn, qtype: str, x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """One call of a block-quantized kernel: x [n, in] @ W.T with W = (q [out, ...], scales f32 [out, in/32])."""
    x, q, y = _prep(x, q, q.shape[0])
    scales = np.ascontiguousarray(scales, dtype=np.float32)
    fn(_ptr("float[]", x), x.shape[0], x.shape[1], _ptr(qtype, q), _ptr("float[]", scales), q.shape[0],
       _ptr("float[]", y))
    return y


def matmul_q8(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_32 weights, float activations (twin: ref.matmul with a Q8Weight)."""
    return _matmul_blocks(lib.pk_matmul_q8, "int8_t[]", x, q, scales)


def matmul_q4(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q4_32 weights, float activations (twin: ref.matmul with a Q4Weight)."""
    return _matmul_blocks(lib.pk_matmul_q4, "uint8_t[]", x, q, scales)


def matmul_q8a(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_32 weights x int8-quantized activations (twin: ref.matmul_act_q8)."""
    return _matmul_blocks(lib.pk_matmul_q8a, "int8_t[]", x, q, scales)


def matmul_q4a(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q4_32 weights x int8-quantized activations (twin: ref.matmul_act_q4)."""
    return _matmul_blocks(lib.pk_matmul_q4a, "uint8_t[]", x, q, scales)


def matmul_q8w(x: np.ndarray, q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_32 weights x int16-quantized activations (twin: ref.matmul_act16_q8)."""
    return _matmul_blocks(lib.pk_matmul_q8w, "int8_t[]", x, q, scales)


def quant_act16(x: np.ndarray):
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, in_f = x.shape
    nb = -(-in_f // 32)
    xq = np.empty((n, nb * 32), dtype=np.int16)
    xd = np.empty((n, nb), dtype=np.float32)
    lib.pk_quant_act16(_ptr("float[]", x), n, in_f, _ptr("int16_t[]", xq), _ptr("float[]", xd))
    return xq, xd


def quant_act(x: np.ndarray):
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, in_f = x.shape
    nb = -(-in_f // 32)
    xq = np.empty((n, nb * 32), dtype=np.int8)
    xd = np.empty((n, nb), dtype=np.float32)
    lib.pk_quant_act(_ptr("float[]", x), n, in_f, _ptr("int8_t[]", xq), _ptr("float[]", xd))
    return xq, xd


FMT = {"f32": 0, "bf16": 1, "q8_32": 2, "q4_32": 3}   # weights.KINDS the C kernels read
ACT = {"f32": 0, "i8": 1, "i16": 2, "bf16": 3}
ROWS = 16          # csrc A_ROWS, OR'd into a job's act: the per-row kernels at any n (each row what it gets alone)
_CT = {0: "float[]", 1: "uint16_t[]", 2: "int8_t[]", 3: "uint8_t[]"}


def _weight_buffers(f: int, wdata, scales, owner=None):
    """A stored weight's contiguous arrays and C pointers: (w, scales, w ptr, scales ptr or NULL). The
    arrays are returned so the caller keeps them alive through the call. With ``owner``, the weight object
    the arrays belong to (immutable; its arrays are views of the mapped file that never move), the result is
    made once and kept on it: a decode step passes ~25 weights per layer, and rebuilding their pointers each
    time was a visible part of the step's Python time."""
    if owner is not None:
        got = getattr(owner, "_c_buffers", None)
        if got is not None and got[0] == f:
            return got[1]
    wdata = np.ascontiguousarray(wdata)
    if scales is not None:
        scales = np.ascontiguousarray(scales, dtype=np.float32)
    res = (wdata, scales, ffi.cast("void *", _ptr(_CT[f], wdata)),
           _ptr("float[]", scales) if scales is not None else ffi.NULL)
    if owner is not None and hasattr(owner, "__dict__"):
        object.__setattr__(owner, "_c_buffers", (f, res))   # frozen dataclasses: a derived, immutable cache
    return res


def _job_buffers(x, kind, wdata, scales, owner=None):
    """One job's contiguous buffers and C pointers: (fmt, x, w, scales, x ptr, w ptr, scales ptr or NULL)."""
    f = FMT[kind]
    x = np.ascontiguousarray(x, dtype=np.float32)
    wdata, scales, wp, sp = _weight_buffers(f, wdata, scales, owner)
    return (f, x, wdata, scales, _ptr("float[]", x), wp, sp)


def matmul_many(jobs, rows: bool = False):
    """jobs: list of (x [n, in] f32, kind, wdata, scales or None, act[, owner]) -> list of y [n, out], in one C
    call (one OpenMP region for all). kind in FMT; act in ACT; owner: see _weight_buffers. rows: every job on
    the per-row kernels (ROWS)."""
    bufs = [_job_buffers(*j[:4], *j[5:]) for j in jobs]
    ys = [np.empty((b[1].shape[0], b[2].shape[0]), dtype=np.float32) for b in bufs]
    flag = ROWS if rows else 0
    rc = lib.pk_matmul_many(len(jobs), [b[0] for b in bufs], [ACT[j[4]] | flag for j in jobs], [b[4] for b in bufs],
                            [b[1].shape[0] for b in bufs], [b[1].shape[1] for b in bufs], [b[5] for b in bufs],
                            [b[6] for b in bufs], [b[2].shape[0] for b in bufs], [_ptr("float[]", y) for y in ys])
    if rc != 0:
        raise MemoryError(f"pk_matmul_many failed ({rc})")
    return ys


def expert_record(kind: str, act: str, g, u, dn):
    """(pk_expert cdata, what keeps its arrays alive) for one expert; g, u, dn: (data, scales, owner)."""
    f = FMT[kind]
    gb, ub, db = (_weight_buffers(f, *b) for b in (g, u, dn))
    e = ffi.new("pk_expert *")
    e.fmt, e.act, e.inter = f, ACT[act], gb[0].shape[0]
    e.g, e.u, e.d = gb[2], ub[2], db[2]
    e.sg, e.su, e.sd = gb[3], ub[3], db[3]
    return e, (gb, ub, db)


def swiglu_sum(x: np.ndarray, records, coefs) -> np.ndarray:
    """One token's MoE FFN in one C call: sum_k coefs[k] * down_k(silu(gate_k(x)) * up_k(x)).
    x f32 [d]; records: expert_record() of each expert (gate/up [I_k, d], down [d, I_k])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    arr = ffi.new("pk_expert[]", [r[0][0] for r in records])
    out = np.empty(x.shape[0], dtype=np.float32)
    coefs = np.ascontiguousarray(coefs, dtype=np.float32)
    rc = lib.pk_swiglu_sum(len(records), arr, _ptr("float[]", x), x.shape[0], _ptr("float[]", coefs),
                           _ptr("float[]", out))
    if rc != 0:
        raise MemoryError(f"pk_swiglu_sum failed ({rc})")
    return out


def linear_record(kind: str, act: str, shape, wdata, scales, owner=None):
    """(pk_linear cdata, what keeps its arrays alive) for one stored weight [out, in] of a fused call (o_proj,
    the router); shape: its logical (out, in); made once and kept on ``owner`` (see _weight_buffers) when it
    is a weight object."""
    f = FMT[kind]
    if owner is not None:
        got = getattr(owner, "_c_linear", None)
        if got is not None and got[0] == (f, act):
            return got[1]
    b = _weight_buffers(f, wdata, scales, owner)
    r = ffi.new("pk_linear *")
    r.fmt, r.act, r.n_out, r.n_in, r.w, r.scales = f, ACT[act], int(shape[0]), int(shape[1]), b[2], b[3]
    res = (r, b)
    if owner is not None and hasattr(owner, "__dict__"):
        object.__setattr__(owner, "_c_linear", ((f, act), res))
    return res


def _mla_args(q, kva, ln, inv_freq, kind: str, wdata, scales, owner):
    """The absorbed attention calls' common arguments: contiguous f32 q / kva / ln / inv_freq, the kv_b format and
    its buffers -> (q, kva, ln, inv_freq, fmt, weight pointer, scales pointer, keep: the buffers to hold alive)."""
    f = FMT[kind]
    wdata, scales, wp, sp = _weight_buffers(f, wdata, scales, owner)
    return (np.ascontiguousarray(q, dtype=np.float32), np.ascontiguousarray(kva, dtype=np.float32),
            np.ascontiguousarray(ln, dtype=np.float32), np.ascontiguousarray(inv_freq, dtype=np.float32), f, wp, sp,
            (wdata, scales))


def mla_absorbed_o(q, kva, ln, eps: float, inv_freq, pos: int, rows: np.ndarray, n: int, kind: str, act: str,
                   wdata, scales, owner, scale: float, dims, o_rec) -> np.ndarray:
    """pk_mla_absorbed_o: pk_mla_absorbed then o_proj (o_rec: linear_record) in one call -> y f32 [out]; rows as
    in :func:`mla_absorbed` (f32 or bf16 bits)."""
    H, dn, dr, dv, R = dims
    cdt = cache_dtype_code(rows)                                  # f32 or bf16 rows, written in place
    q, kva, ln, inv_freq, f, wp, sp, keep = _mla_args(q, kva, ln, inv_freq, kind, wdata, scales, owner)
    o = np.empty(H * dv, dtype=np.float32)
    y = np.empty(o_rec[0].n_out, dtype=np.float32)
    rc = lib.pk_mla_absorbed_o(H, dn, dr, dv, R, _ptr("float[]", q), _ptr("float[]", kva), _ptr("float[]", ln),
                               float(eps), _ptr("float[]", inv_freq), int(pos), _ptr("char[]", rows), cdt, int(n),
                               f, ACT[act], wp, sp, float(scale), o_rec[0], _ptr("float[]", o), _ptr("float[]", y))
    if rc != 0:
        raise (MemoryError if rc == -1 else ValueError)(f"pk_mla_absorbed_o failed ({rc})")
    return y


def route(x: np.ndarray, gate_rec, bias, E: int, k: int, n_group: int, topk_group: int, group_top2: bool,
          norm: bool, scaling: float, sigmoid: bool):
    """pk_route: router logits of x [B, d] (each row alone) and moe.select_experts' selection
    -> (logits [B, E], scores [B, E], ids int32 [B, k], weights [B, k], margin [B])."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    B, d = x.shape
    logits = np.empty((B, E), np.float32)
    scores = np.empty((B, E), np.float32)
    ids = np.empty((B, k), np.int32)
    weights = np.empty((B, k), np.float32)
    margin = np.empty(B, np.float32)
    rc = lib.pk_route(B, _ptr("float[]", x), d, gate_rec[0], _ptr("float[]", bias) if bias is not None else ffi.NULL,
                      E, k, n_group, topk_group, bool(group_top2), bool(norm), float(scaling), bool(sigmoid),
                      _ptr("float[]", logits), _ptr("float[]", scores), _ptr("int[]", ids), _ptr("float[]", weights),
                      _ptr("float[]", margin))
    if rc != 0:
        raise (MemoryError if rc == -1 else ValueError)(f"pk_route failed ({rc})")
    return logits, scores, ids, weights, margin


def heads(op: str, x: np.ndarray, kind: str, wdata: np.ndarray, scales, in_f: int, row0: int, stride: int,
          rows: int, act: str = "f32") -> np.ndarray:
    """Per-head products on row blocks of ONE stored weight, in one C call, without a Python object per head:
    head h uses weight rows [row0 + h*stride, row0 + h*stride + rows).
      op "vecmat": x [H, rows] -> y [H, in],   y[h] = x[h] @ W_h     (pk_vecmat_many)
      op "matvec": x [H, in]   -> y [H, rows], y[h] = W_h @ x[h]     (pk_matmul_many, one row of x per job)
    in_f is W's logical width. The absorbed MLA decode's W_uk / W_uv of every head are such blocks of
    kv_b_proj."""
    f = FMT[kind]
    H = x.shape[0]
    x = np.ascontiguousarray(x, dtype=np.float32)
    wdata = np.ascontiguousarray(wdata)
    wb, rb = ffi.cast("char *", _ptr(_CT[f], wdata)), wdata.strides[0]
    starts = [row0 + h * stride for h in range(H)]
    ws = [ffi.cast("void *", wb + r * rb) for r in starts]
    if scales is not None:
        scales = np.ascontiguousarray(scales, dtype=np.float32)
        sb, nb = ffi.cast("float *", _ptr("float[]", scales)), scales.shape[1]
        ss = [sb + r * nb for r in starts]
    else:
        ss = [ffi.NULL] * H
    xp = ffi.cast("float *", _ptr("float[]", x))
    if op == "vecmat":
        y = np.empty((H, in_f), dtype=np.float32)
        yp = ffi.cast("float *", _ptr("float[]", y))
        rc = lib.pk_vecmat_many(H, [f] * H, [xp + h * rows for h in range(H)], [rows] * H, [in_f] * H, ws, ss,
                                [yp + h * in_f for h in range(H)])
    else:
        y = np.empty((H, rows), dtype=np.float32)
        yp = ffi.cast("float *", _ptr("float[]", y))
        rc = lib.pk_matmul_many(H, [f] * H, [ACT[act]] * H, [xp + h * in_f for h in range(H)], [1] * H, [in_f] * H,
                                ws, ss, [rows] * H, [yp + h * rows for h in range(H)])
    if rc != 0:
        raise ValueError(f"pk_{op} on {H} heads failed ({rc})")
    return y


def cache_dtype_code(rows: np.ndarray) -> int:
    """The C kernels' cdt of a cache buffer: 0 for float32 rows, 1 for bf16 rows (uint16 bits). ValueError
    for anything else, or a buffer that is not C-contiguous (written in place: no converted copy)."""
    if rows.dtype not in (np.float32, np.uint16) or not rows.flags.c_contiguous:
        raise ValueError(f"mla_absorbed: cache rows are {rows.dtype}{list(rows.shape)}, expected contiguous "
                         f"float32 or bf16 (uint16)")
    return 0 if rows.dtype == np.float32 else 1


def mla_absorbed(q, kva, ln, eps: float, inv_freq, pos: int, rows: np.ndarray, n: int, kind: str, act: str,
                 wdata, scales, owner, scale: float, dims) -> np.ndarray:
    """pk_mla_absorbed (one decode token's absorbed MLA attention; writes rows[n]) -> o f32 [H, dv].
    rows: the layer's cache buffer, C-contiguous [>= n + 1, R + dr], float32 or bf16 bits (uint16; written in
    place, the new row rounded to nearest even); dims = (H, dn, dr, dv, R)."""
    H, dn, dr, dv, R = dims
    cdt = cache_dtype_code(rows)
    q, kva, ln, inv_freq, f, wp, sp, keep = _mla_args(q, kva, ln, inv_freq, kind, wdata, scales, owner)
    out = np.empty((H, dv), dtype=np.float32)
    rc = lib.pk_mla_absorbed(H, dn, dr, dv, R, _ptr("float[]", q), _ptr("float[]", kva), _ptr("float[]", ln),
                             float(eps), _ptr("float[]", inv_freq), int(pos), _ptr("char[]", rows), cdt, int(n), f,
                             ACT[act], wp, sp, float(scale), _ptr("float[]", out))
    if rc != 0:
        raise (MemoryError if rc == -1 else ValueError)(f"pk_mla_absorbed failed ({rc})")
    return out


def set_threads(n: int) -> None:
    lib.pk_set_threads(int(n))


def get_threads() -> int:
    return int(lib.pk_get_threads())


SIMD_LEVELS = ("scalar", "avx2", "avx512")  # index = the C level (pk_get_simd)
_SIMD_NAMES = {"scalar": "portable", "avx2": "avx2+fma", "avx512": "avx512+vnni"}


def simd_levels() -> list:
    """The levels this CPU can run, lowest first, e.g. ["scalar", "avx2", "avx512"]."""
    return list(SIMD_LEVELS[: int(lib.pk_simd_max()) + 1])


def get_simd() -> str:
    """The level the kernels run at now: "scalar" | "avx2" | "avx512"."""
    return SIMD_LEVELS[int(lib.pk_get_simd())]


def set_simd(level: str | None) -> str:
    """Run the kernels at `level` ("scalar" | "avx2" | "avx512"; None or "auto" = the best available).
    Default: PYKIMI_SIMD, else the best. Raises ValueError for a level this CPU cannot run."""
    if level is None or str(level).lower() in ("auto", "best", ""):
        lib.pk_set_simd(-1)
        return get_simd()
    name = {"portable": "scalar", "0": "scalar", "1": "avx2", "2": "avx512"}.get(str(level).lower(), str(level).lower())
    if name not in SIMD_LEVELS:
        raise ValueError(f"unknown SIMD level {level!r}: expected one of {', '.join(SIMD_LEVELS)} or auto")
    if name not in simd_levels():
        raise ValueError(f"SIMD level {name!r} is not available on this CPU/build (have {', '.join(simd_levels())})")
    lib.pk_set_simd(SIMD_LEVELS.index(name))
    return get_simd()


def get_amx() -> bool:
    """Whether bf16 batches run on AMX tiles (the CPU has AMX-BF16, Linux granted it, not turned off)."""
    return bool(lib.pk_get_amx())


def set_amx(on: bool) -> bool:
    """Turn AMX for bf16 batches on (where available) or off (tests, benchmarks); returns get_amx()."""
    lib.pk_set_amx(1 if on else 0)
    return get_amx()


def get_avx512bf16() -> bool:
    """Whether bf16-activation batches run on the AVX512_BF16 kernel (the build has it, the CPU runs the AVX-512
    level with AVX512_BF16, not turned off by PYKIMI_AVX512BF16=0 / set_avx512bf16(False))."""
    return bool(lib.pk_get_avx512bf16())


def set_avx512bf16(on: bool) -> bool:
    """Turn the AVX512_BF16 kernel on (where available) or off (tests, benchmarks); returns get_avx512bf16()."""
    lib.pk_set_avx512bf16(1 if on else 0)
    return get_avx512bf16()


def get_vnni_batch() -> bool:
    """Whether int8-activation batches of Q8_32 / Q4_32 weights (from vnni_min(kind) rows) run the int8 batch kernel at
    the current level: the VNNI kernel at the AVX-512 level, its vpmaddubsw twin at the AVX2 level (not turned off by
    PYKIMI_VNNI_BATCH=0 / set_vnni_batch(False); never at the portable level)."""
    return bool(lib.pk_get_vnni_batch())


def set_vnni_batch(on: bool) -> bool:
    """Turn the int8 batch kernels (both levels) on or off (tests, benchmarks: off = the per-row kernels at every n);
    returns get_vnni_batch()."""
    lib.pk_set_vnni_batch(1 if on else 0)
    return get_vnni_batch()


def vnni_min(kind: str) -> int:
    """Rows of x from which an int8-activation job on a weight of ``kind`` ("q8_32" / "q4_32") takes the int8 batch
    kernel at the current level (AVX-512: csrc PK_VNNI_MIN_Q8 / _Q4, mirrored by linear.C_VNNI_MIN; AVX2:
    PK_AVX2B_MIN_Q8 / _Q4, linear.C_VNNI_MIN_AVX2; -1 at the portable level)."""
    return int(lib.pk_vnni_min(FMT[kind]))


def get_vnni16_batch() -> bool:
    """Whether int16-activation batches of Q8_32 weights (the default mode's Q8, from vnni16_min() rows) run the int16
    batch kernel of the level (csrc PK_VW_KERNEL, vpdpwssd, at the AVX-512 level; its vpmaddwd twin PK_AW_KERNEL at
    the AVX2 level): at either level, not turned off by PYKIMI_VNNI16_BATCH=0 / set_vnni16_batch(False)."""
    return bool(lib.pk_get_vnni16_batch())


def set_vnni16_batch(on: bool) -> bool:
    """Turn the int16 batch kernels (both levels) on or off (tests, benchmarks: off = the int16 row kernel at every n
    in C); returns get_vnni16_batch()."""
    lib.pk_set_vnni16_batch(1 if on else 0)
    return get_vnni16_batch()


def vnni16_min() -> int:
    """Rows of x from which an int16-activation Q8_32 job takes the int16 batch kernel at the current level (AVX-512:
    csrc PK_VNNI16_MIN_Q8, mirrored by linear.C_VNNI16_MIN; AVX2: PK_AVX2W_MIN_Q8, linear.C_VNNI16_MIN_AVX2; -1 at the
    portable level)."""
    return int(lib.pk_vnni16_min())


def info() -> dict:
    return {"openmp": bool(lib.pk_has_openmp()), "simd": _SIMD_NAMES[get_simd()],
            "simd_levels": simd_levels(), "threads": int(lib.pk_get_threads()),
            "amx": bool(lib.pk_amx_available()) and get_amx(),
            "avx512bf16": bool(lib.pk_avx512bf16_available()) and get_avx512bf16(),
            "vnni_batch": get_vnni_batch(), "vnni16_batch": get_vnni16_batch()}


def force_scalar(on: bool) -> None:
    """Tests: run the portable loops even on a SIMD machine (off = back to the best level)."""
    lib.pk_force_scalar(1 if on else 0)
