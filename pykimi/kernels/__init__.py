"""The one dispatch point for pykimi's kernels.

    y = kernels.matmul(x, w)      # x f32 [n, in] (or [in]); w f32 ndarray | Stored | Q8Weight | Q4Weight

Backends: "c" (csrc/ via cffi), "numba", "numpy" (ref.py, the spec). The default is the fastest one that
imports; ``PYKIMI_BACKEND=numpy|numba|c`` or ``set_backend(name)`` picks one. A missing C extension falls
back to Numba, then NumPy, with ONE warning saying why.

Routing of matmul (why): decode is memory bound, so for few rows of x (n <= SMALL_N, or the per-format
SMALL_N_ACT when set for the C kernels with quantized activations) W is read once in its
stored form by a GEMV / small-GEMM kernel that widens in registers. Prefill and vision are compute bound,
so for larger n W is widened in small row tiles (TASK_ELEMS floats) that worker threads multiply with
single-threaded BLAS (parallel_for). f32 ndarrays always go to BLAS (nothing to widen). For int8/int4 weights the C GEMV quantizes the
activation row once per call and uses integer block dot products (set_act_quant; int16 activations for
int8 weights by default, so int8 stays numerically the float product). At the AVX-512 level a prefill's
per-expert batches (bf16: 12..112 rows, int8: C_BATCH_ROWS_Q8, as the exact f32 product) run a C kernel
vectorised over the rows of x instead (see csrc); with AMX, bf16 batches from 8 rows and int8 ones from 32,
up to C_AMX_ROWS, run on the tile unit (x in three bf16 parts: an f32 product). matmul_many(xs, ws) runs several
products in one C call / one thread fork-join (the MoE's selected experts). heads_vecmat runs the transposed
use, x @ W (a combination of stored rows, pk_vecmat_many), and heads_matvec the GEMV, on per-head row blocks
of one stored weight in one call -- the absorbed MLA decode's q_nope · W_uk and W_uv · o_lat on kv_b_proj,
so decode never widens kv_b_proj. mla_absorbed runs one decode token's whole absorbed attention (norm, RoPE,
the cache row, scores, softmax, both absorbed products) and swiglu_sum one token's whole MoE FFN (routed +
shared experts), one C call each. The small fused ops (rms_norm, add_rms_norm, softmax, rope, the router's
selection route_select, MoE dispatch) use Numba unless the backend is "numpy".

Each fast path has its NumPy twin in ref.py; reference(x, w) names the exact twin of what matmul(x, w)
computes under the current settings (the tests hold every backend to it).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import itertools
import os
import threading
import warnings

import numpy as np

from . import ref

BACKENDS = ("numpy", "numba", "c")
SMALL_N = 32            # rows of x up to which the stored-form kernels beat widen + BLAS (measured: ~28-45)
# The same crossover for the C kernels with quantized activations, per (weight format, activation mode): their
# integer block dots cost less per row than f32 sgemm, and dequantizing a tile costs more than widening bf16.
# Measured with the C backend on a [1408, 2048] expert weight, 2 threads (ms, C vs dequant tiles + sgemm):
# q8 x int16 n=32 1.8 vs 4.6, n=48 4.8 vs 4.9, n=64 6.2 vs 5.9; q4 x int8 n=64 3.1 vs 6.5, n=128 5.2 vs 9.5
# (the C cost grows more slowly with n than sgemm's there, so int4 need never go to the tiles; like llama.cpp's
# Q4_0 x Q8_0 prefill); with MEASURED_SMALL_N_ACT the 128-token int4 prefill ran 1.26x faster (median of 4,
# same process). Same numerics as decode for these formats (see set_act_quant); reference() returns the twin
# of whichever path a product takes. PYKIMI_ACT_QUANT=none keeps every quantized product on the exact path.
# q8 x int16 in a real 128-token int8 prefill (experts get ~6-77 rows each), alternating in one process:
# crossover 48 -> 123 tok/s, 64 -> 124, 96 -> 129, 128 -> 125 (two runs of four rounds, medians); so 96 --
# and 112 at the AVX-512 level, where 24..112 rows run the batch-vectorised kernel (C_BATCH_ROWS_Q8).
# bf16 (f32 activations) at the AVX-512 level: from 12 rows the C kernel vectorises over the rows of x
# (bf16_tn_avx512, groups of 64 rows); [1408, 2048] products, 2 threads, GFLOP/s C vs widened tiles + sgemm:
# n=16 147-156 vs 48, n=32 166-180 vs 73, n=64 167 vs 118, n=80 157 vs 133, n=112 161 vs 157, n=128 157 vs
# 165. Other levels: SMALL_N.
MEASURED_SMALL_N_ACT = {("q8_32", "i16"): 96, ("q8_32", "i8"): 48, ("q4_32", "i8"): 1 << 62,
                        ("BF16", "f32"): 112}
SMALL_N_ACT: dict = dict(MEASURED_SMALL_N_ACT)
# Rows of x for which the AVX-512 C kernel runs Q8_32 weights batch-vectorised, as the f32 product of the
# decoded weights rather than with quantized activations (PK_TN_MIN_Q8 / PK_TN_MAX in csrc): [1408, 2048],
# 2 threads, GFLOP/s int16-activation rows vs batch-vectorised: n=12 116 vs 92, 16 121 vs 123, 32 125 vs 166,
# 64 128 vs 172, 96 119 vs 173, 112 117 vs 161 (widened tiles 152).
C_BATCH_ROWS_Q8 = (24, 112)
# With AMX (bf16 tile products in the C kernels, pk_get_amx; PYKIMI_AMX=0 turns them off) bf16 batches from 8
# rows of x and Q8_32 batches from 32 rows (csrc PK_AMX_MIN, PK_AMX_MIN_Q8; Q8 as the exact f32 product of the
# decoded weights, like the batch-vectorised kernel) stay on the C kernels up to C_AMX_ROWS rows. [1408, 2048],
# 2 threads, GFLOP/s bf16 AMX vs widened tiles + sgemm: n=32 347 vs 101, 64 395 vs 163, 128 478 vs 202, 256 441
# vs 244, 512 457 vs 289; Q8 AMX vs the batch-vectorised kernel: 32 258 vs 231, 128 299 vs 212.
C_AMX_ROWS = 512
C_AMX_MIN_Q8 = 32
TILE_ELEMS = 1 << 22    # widened tile size for the BLAS path (16 MB of f32), an upper bound
TASK_ELEMS = 1 << 19    # widened tile per worker task (2 MB of f32: within the 2 MiB L2 between widening and
                        # sgemm). Prefill of the 4-layer model, alternating in one process: 512 tokens 177 tok/s
                        # with 1 MB tiles, 190 with 2 MB, 186 with 4 MB; 128 tokens 130 / 130 / 134.

_state = {"backend": None, "threads": None, "warned": False,
          # int8-quantized activations in the C GEMV, per weight format (see set_act_quant)
          "act_quant": None}
_avail: dict[str, tuple[bool, str]] = {}
_mods: dict[str, object] = {}


# --------------------------------------------------------------------------------- availability

def _probe(name: str) -> tuple[bool, str]:
    if name in _avail:
        return _avail[name]
    ok, why = True, ""
    try:
        if name == "c":
            from . import c as mod
        elif name == "numba":
            from . import numba_kernels as mod
        else:
            mod = ref
        _mods[name] = mod
    except Exception as e:  # ImportError, a broken .so, numba/llvmlite mismatch ...
        ok, why = False, f"{type(e).__name__}: {e}".splitlines()[0]
        if name == "c" and isinstance(e, ImportError):
            why = ("C extension pykimi._ckernels not built (pip install . with a C compiler, or "
                   "python -m pykimi.kernels._build)")
    _avail[name] = (ok, why)
    return ok, why


def backends() -> dict:
    """{name: {"available": bool, "reason": str, ...details}} for every backend (for `pykimi info --backends`)."""
    out = {}
    for name in BACKENDS:
        ok, why = _probe(name)
        d = {"available": ok, "reason": why or "ok"}
        if ok and name == "c":
            d.update(_mods["c"].info())
        if ok and name == "numba":
            import numba
            d.update(version=numba.__version__, threads=numba.get_num_threads())
        out[name] = d
    out["active"] = backend()
    return out


def _choose(requested: str | None) -> str:
    if requested:
        requested = requested.strip().lower()
        if requested not in BACKENDS:
            raise ValueError(f"PYKIMI_BACKEND={requested!r}: expected one of {', '.join(BACKENDS)}")
        ok, why = _probe(requested)
        if ok:
            return requested
        order = BACKENDS[:BACKENDS.index(requested)][::-1]
        first_why = why
    else:
        order = ("c", "numba", "numpy")
        first_why = None
    for name in order:
        ok, why = _probe(name)
        if ok:
            if first_why is None and name != "c":
                first_why = _avail["c"][1]
            if first_why is not None and not _state["warned"]:
                _state["warned"] = True
                warnings.warn(f"pykimi: {first_why}; using the {name} backend (slower)", RuntimeWarning,
                              stacklevel=3)
            return name
        if first_why is None:
            first_why = why
    return "numpy"


def backend() -> str:
    """The active backend name."""
    if _state["backend"] is None:
        _state["backend"] = _choose(os.environ.get("PYKIMI_BACKEND") or None)
        _apply_threads()
    return _state["backend"]


def set_backend(name: str) -> str:
    """Select a backend explicitly; raises ValueError naming the reason if it is unavailable."""
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: expected one of {', '.join(BACKENDS)}")
    ok, why = _probe(name)
    if not ok:
        raise ValueError(f"backend {name!r} is unavailable: {why}")
    _state["backend"] = name
    _apply_threads()
    return name


# ---------------------------------------------------------------------------------------- threads

def get_threads() -> int:
    if _state["threads"] is None:
        try:
            n = int(os.environ.get("PYKIMI_THREADS", "0"))
        except ValueError:
            n = 0
        _state["threads"] = n if n > 0 else (os.cpu_count() or 1)
    return _state["threads"]


def set_threads(n: int) -> None:
    """Threads for the C (OpenMP) and Numba kernels (BLAS keeps its own setting)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    _state["threads"] = n
    _apply_threads()


def _apply_threads() -> None:
    n = get_threads()
    if "c" in _mods:
        _mods["c"].set_threads(n)
    if "numba" in _mods:
        import numba
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


# ----------------------------------------------------------------- worker threads for the BLAS paths
# Prefill and vision are compute bound and go through BLAS (DESIGN.md "Memory and speed"). Instead of one big
# multi-threaded BLAS call per product, they cut the work into tasks (weight row tiles, token chunks, heads)
# that get_threads() Python threads take one at a time, each calling BLAS single-threaded: NumPy's BLAS and
# ufuncs release the GIL, and dynamic taking balances the cores when one is shared with another process
# (see _matmul_tiled). NumPy's OpenBLAS is switched to one thread only while such tasks run.

_tls = threading.local()          # .inside: this thread is a worker task (nested parallel_for runs inline)
_blas_lock = threading.Lock()
_blas_state = {"probed": False, "set": None, "get": None, "users": 0, "saved": None}
_pool_state: dict = {"pool": None, "size": 0}


def _openblas():
    """(set_num_threads, get_num_threads) of the OpenBLAS NumPy links (its wheel bundles scipy-openblas), or
    (None, None) when there is none to find (another BLAS: then tasks run beside its own threads)."""
    st = _blas_state
    if not st["probed"]:
        st["probed"] = True
        libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
        for path in sorted(glob.glob(os.path.join(libdir, "*openblas*"))):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for pre in ("scipy_openblas_", "openblas_"):
                for suf in ("64_", ""):
                    f_set = getattr(lib, f"{pre}set_num_threads{suf}", None)
                    f_get = getattr(lib, f"{pre}get_num_threads{suf}", None)
                    if f_set is not None and f_get is not None:
                        f_get.restype = ctypes.c_int
                        st["set"], st["get"] = f_set, f_get
                        return f_set, f_get
    return st["set"], st["get"]


class _blas_single:
    """Context: NumPy's OpenBLAS single-threaded (restored when the last user leaves)."""

    def __enter__(self):
        f_set, f_get = _openblas()
        if f_set is not None:
            with _blas_lock:
                if _blas_state["users"] == 0:
                    _blas_state["saved"] = int(f_get())
                    f_set(ctypes.c_int(1))
                _blas_state["users"] += 1
        return self

    def __exit__(self, *exc):
        f_set, _ = _openblas()
        if f_set is not None:
            with _blas_lock:
                _blas_state["users"] -= 1
                if _blas_state["users"] == 0 and _blas_state["saved"]:
                    f_set(ctypes.c_int(_blas_state["saved"]))


def _pool(n: int):
    if _pool_state["pool"] is None or _pool_state["size"] != n:
        from concurrent.futures import ThreadPoolExecutor
        if _pool_state["pool"] is not None:
            _pool_state["pool"].shutdown(wait=False)
        _pool_state["pool"] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="pykimi-task")
        _pool_state["size"] = n
    return _pool_state["pool"]


def parallel_for(fn, items) -> list:
    """[fn(item) for item in items], run by get_threads() threads (the caller is one of them) that take the
    items in order, one at a time, with BLAS single-threaded inside. fn must write disjoint outputs.
    Runs inline with one thread, one item, or when called from inside a task."""
    items = list(items)
    nt = min(get_threads(), len(items))
    if nt <= 1 or getattr(_tls, "inside", False):
        with _blas_single():
            return [fn(it) for it in items]
    results: list = [None] * len(items)
    ticket = itertools.count()      # next() on a count is atomic under the GIL
    errors: list = []

    def worker():
        _tls.inside = True
        try:
            while not errors:
                i = next(ticket)
                if i >= len(items):
                    return
                results[i] = fn(items[i])
        except BaseException as e:  # noqa: BLE001 -- re-raised in the caller
            errors.append(e)
        finally:
            _tls.inside = False

    with _blas_single():
        futs = [_pool(nt - 1).submit(worker) for _ in range(nt - 1)]
        worker()
        for f in futs:
            f.result()
    if errors:
        raise errors[0]
    return results


_ACT_MODES = {
    # setting -> how the C GEMV treats the activations per weight format
    "q4": {"q8_32": "i16", "q4_32": "i8"},    # default
    "all": {"q8_32": "i8", "q4_32": "i8"},    # fastest, llama.cpp-like
    "none": {"q8_32": "f32", "q4_32": "f32"},  # exact twins of dequantize-then-matmul
}


def _parse_act_quant(value) -> str:
    if isinstance(value, bool):
        return "all" if value else "none"
    v = str(value).strip().lower()
    v = {"1": "all", "true": "all", "on": "all", "0": "none", "false": "none", "off": "none", "": "q4",
         "default": "q4"}.get(v, v)
    if v not in _ACT_MODES:
        raise ValueError(f"PYKIMI_ACT_QUANT={value!r}: expected one of {', '.join(_ACT_MODES)}")
    return v


def set_act_quant(value) -> None:
    """How the C GEMV (n <= SMALL_N) treats activations for quantized weights.

    Why: decoding int4/int8 to f32 in registers costs ~3 vector ops per 8 weights, which makes the quantized
    GEMVs compute bound (int4 slower per token than bf16). Quantizing the activation row once per call and
    doing integer block dot products keeps them memory bound.
      "q4" (default): Q8 weights x int16 activations (rounding ~1e-5 relative: numerically the float
              product), Q4 weights x int8 activations (~0.5 % rms per matmul, small next to int4's own error);
      "all":  int8 activations for both (fastest; like llama.cpp's Q8_0 x Q8_0);
      "none": no activation quantization (dequantize in registers; exact twin of ref.matmul).
    Environment: PYKIMI_ACT_QUANT. True/False mean "all"/"none"."""
    _state["act_quant"] = _parse_act_quant(value)


def act_quant() -> str:
    if _state["act_quant"] is None:
        _state["act_quant"] = _parse_act_quant(os.environ.get("PYKIMI_ACT_QUANT", "q4"))
    return _state["act_quant"]


def _act_mode(kind: str) -> str:
    return _ACT_MODES[act_quant()].get(kind, "f32")


def _small_n(kind: str) -> int:
    """Rows of x up to which matmul uses the stored-form C kernel for this weight format (C backend)."""
    n = SMALL_N_ACT.get((kind, _act_mode(kind)))
    if n is None or (kind == "BF16" and not _c_avx512()):
        return SMALL_N
    if kind in ("BF16", "q8_32") and _c_amx():
        return max(n, C_AMX_ROWS)
    if kind == "q8_32" and _c_avx512() and n >= C_BATCH_ROWS_Q8[0]:
        n = max(n, C_BATCH_ROWS_Q8[1])
    return n


def _c_mode(kind: str, n: int) -> str:
    """The activation mode a C call uses for n rows of x: the setting's, except Q8_32 weights with
    C_BATCH_ROWS_Q8 rows at the AVX-512 level (or C_AMX_MIN_Q8..C_AMX_ROWS with AMX), which run the exact f32
    product (batch-vectorised kernel, AMX tiles)."""
    if kind == "q8_32" and _c_avx512() and (C_BATCH_ROWS_Q8[0] <= n <= C_BATCH_ROWS_Q8[1]
                                            or (C_AMX_MIN_Q8 <= n <= C_AMX_ROWS and _c_amx())):
        return "f32"
    return _act_mode(kind)


def _c_avx512() -> bool:
    c = _mods.get("c")
    return c is not None and c.get_simd() == "avx512"


def _c_amx() -> bool:
    """The C kernels run bf16 batches on AMX (the AVX-512 level, a CPU and kernel that grant it, not turned off)."""
    c = _mods.get("c")
    return c is not None and c.get_simd() == "avx512" and c.get_amx()


def reference(x, w) -> np.ndarray:
    """The NumPy twin of exactly what matmul(x, w) computes under the current settings (for tests)."""
    kind = ref.weight_kind(w)
    x = np.asarray(x, dtype=np.float32)
    n = int(np.prod(x.shape[:-1], dtype=np.int64))
    mode = _act_mode(kind)
    if backend() == "c" and mode != "f32" and 0 < n <= _small_n(kind):
        if _c_mode(kind, n) == "f32":
            return ref.matmul(x, w)          # the batch-vectorised C kernel: f32 product of the decoded weights
        x2 = x.reshape(-1, x.shape[-1])
        if kind == "q4_32":
            y = ref.matmul_act_q4(x2, w)
        else:
            y = ref.matmul_act16_q8(x2, w) if mode == "i16" else ref.matmul_act_q8(x2, w)
        return y.reshape(x.shape[:-1] + (w.shape[0],))
    return ref.matmul(x, w)


# ----------------------------------------------------------------------------------------- matmul

_C_KINDS = ("BF16", "q8_32", "q4_32", "F32")


def _widen_rows(w, kind: str, r0: int, r1: int, buf: np.ndarray | None) -> np.ndarray:
    """Rows r0:r1 of W as f32 into buf (when given), single-threaded: called from the worker tasks of
    parallel_for, so it must neither fork threads of its own nor hold the GIL (Numba, nogil)."""
    if kind == "f32":
        return w[r0:r1]                                  # nothing to widen: a view
    dst = buf[: (r1 - r0) * w.shape[1]].reshape(r1 - r0, w.shape[1]) if buf is not None else None
    nb = _nb() if kind in ("BF16", "q8_32", "q4_32") else None
    if nb is None:
        t = ref.weight_rows_f32(w, r0, r1)
        if dst is None:
            return t
        dst[...] = t
        return dst
    if dst is None:
        dst = np.empty((r1 - r0, w.shape[1]), dtype=np.float32)
    if kind == "BF16":
        nb.widen_bf16(np.ascontiguousarray(w.data[r0:r1]).view(np.uint16), dst)
    elif kind == "q8_32":
        nb.dequant_q8(np.ascontiguousarray(w.q[r0:r1]), np.ascontiguousarray(w.scales[r0:r1]), dst)
    else:
        nb.dequant_q4(np.ascontiguousarray(w.q[r0:r1]), np.ascontiguousarray(w.scales[r0:r1]), dst)
    return dst


def _matmul_tiled(x2: np.ndarray, w, kind: str) -> np.ndarray:
    """x2 @ W.T for many rows: W widened in row tiles of at most TASK_ELEMS floats, each tile multiplied by
    single-threaded BLAS, the tiles shared out to the worker threads (parallel_for).

    Why not one big widen + 2-thread BLAS: OpenBLAS splits every call statically between its threads, so when
    another process holds one core (the usual state of this machine) each call waits for the descheduled half,
    and its spinning idle threads steal the core from the next step (measured: 128-token prefill 13 tok/s with
    2 BLAS threads vs 51 with 1, same minute). Small tiles taken dynamically keep both cores busy when free and
    degrade to one core's speed, not below, when one is taken; a 1 MB tile is still in L2 when sgemm reads it."""
    out_f, in_f = w.shape
    n = x2.shape[0]
    step = max(1, min(TILE_ELEMS, TASK_ELEMS) // max(in_f, 1))
    y = np.empty((n, out_f), dtype=np.float32)
    if out_f == 0 or n == 0:
        return y if in_f else y.fill(0) or y
    tiles = [(r0, min(out_f, r0 + step)) for r0 in range(0, out_f, step)]
    bufs = threading.local()

    def task(t):
        r0, r1 = t
        buf = getattr(bufs, "buf", None)
        if buf is None:
            buf = bufs.buf = np.empty(step * in_f, dtype=np.float32)   # one scratch tile per worker
        np.matmul(x2, _widen_rows(w, kind, r0, r1, buf).T, out=y[:, r0:r1])

    parallel_for(task, tiles)
    return y


def widen(w, out: np.ndarray | None = None) -> np.ndarray:
    """W in any stored form as float32 [out, in] (or any shape for 1-D / f32 tensors), written into ``out``
    when given (same shape), else a new array. 2-D stored weights are widened in row tiles of TASK_ELEMS by
    the worker threads (parallel_for; Numba, nogil). Twin: ref.weight_f32 (the same exact decoding)."""
    kind = ref.weight_kind(w)
    shape = tuple(int(s) for s in w.shape)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    elif out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"widen: out is {out.dtype}{list(out.shape)}, expected contiguous float32{list(shape)}")
    if kind == "f32":
        out[...] = w
        return out
    if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
        out[...] = w.f32() if hasattr(w, "f32") else ref.weight_f32(w)
        return out
    step = max(1, TASK_ELEMS // shape[1])

    def task(r0):
        r1 = min(shape[0], r0 + step)
        tile = out[r0:r1]
        got = _widen_rows(w, kind, r0, r1, tile.reshape(-1))
        if got is not tile and not np.shares_memory(got, tile):
            tile[...] = got

    parallel_for(task, range(0, shape[0], step))
    return out


def _stored(w, kind: str) -> tuple:
    """(data, scales or None): the arrays the C kernels read for a weight of a C kind."""
    return (w.data, None) if kind in ("BF16", "F32") else (w.q, w.scales)


def _owned(w, kind: str) -> tuple:
    """(data, scales or None, w): _stored plus the weight object, on which the C module keeps its pointers."""
    return _stored(w, kind) + (w,)


def _check_features(x: np.ndarray, w, who: str, label="W") -> tuple[int, int]:
    """(out, in) of weight w, after checking that x's last axis has `in` features."""
    out_f, in_f = (int(s) for s in w.shape)
    if x.shape[-1] != in_f:
        raise ValueError(f"{who} has {x.shape[-1]} features (shape {list(x.shape)}) but weight "
                         f"{getattr(w, 'name', '') or label} is [{out_f}, {in_f}]")
    return out_f, in_f


def matmul(x, w) -> np.ndarray:
    """x @ W.T in float32. x [n, in] or [in] (any leading dims are flattened); W [out, in] in any stored form."""
    x = np.asarray(x)
    kind = ref.weight_kind(w)
    out_f, in_f = _check_features(x, w, "matmul: x")
    lead = x.shape[:-1]
    x2 = np.ascontiguousarray(x.reshape(-1, in_f), dtype=np.float32)
    n = x2.shape[0]
    be = backend()
    if kind == "f32" and n <= SMALL_N:
        y = x2 @ np.asarray(w, dtype=np.float32).T
    elif kind == "f32":
        y = _matmul_tiled(x2, np.asarray(w, dtype=np.float32), kind)
    elif be == "numpy" or kind not in _C_KINDS or n == 0 or n > (_small_n(kind) if be == "c" else SMALL_N):
        y = _matmul_tiled(x2, w, kind)
    elif be == "c":
        cm = _mods["c"]
        if kind == "BF16":
            y = cm.matmul_bf16(x2, w.data)
        elif kind == "q8_32":
            mode = _c_mode(kind, n)
            fn = cm.matmul_q8w if mode == "i16" else (cm.matmul_q8a if mode == "i8" else cm.matmul_q8)
            y = fn(x2, w.q, w.scales)
        elif kind == "q4_32":
            y = (cm.matmul_q4a if _act_mode(kind) == "i8" else cm.matmul_q4)(x2, w.q, w.scales)
        else:
            y = cm.matmul_f32(x2, w.data)
    else:  # numba
        nm = _mods["numba"]
        y = np.empty((n, out_f), dtype=np.float32)
        if kind == "BF16":
            nm.matmul_bf16(x2, np.ascontiguousarray(w.data), y)
        elif kind == "q8_32":
            nm.matmul_q8(x2, np.ascontiguousarray(w.q), np.ascontiguousarray(w.scales), y)
        elif kind == "q4_32":
            nm.matmul_q4(x2, np.ascontiguousarray(w.q), np.ascontiguousarray(w.scales), y)
        else:
            y = x2 @ np.asarray(w.data, dtype=np.float32).T
    return y.reshape(lead + (out_f,))


def matmul_many(xs, ws) -> list:
    """[matmul(x, w) for x, w in zip(xs, ws)], computed together when possible.

    With the C backend every product with few rows (n <= SMALL_N) in a stored form goes into ONE kernel call
    and one thread fork/join (e.g. all selected experts' gate and up projections of a decode step); the rest
    go through matmul one by one. Same numerics as matmul."""
    xs, ws = list(xs), list(ws)
    if len(xs) != len(ws):
        raise ValueError(f"matmul_many: {len(xs)} inputs but {len(ws)} weights")
    if backend() != "c" or len(xs) < 2:
        return [matmul(x, w) for x, w in zip(xs, ws)]
    out: list = [None] * len(xs)
    jobs, where, shapes = [], [], []
    for i, (x, w) in enumerate(zip(xs, ws)):
        x = np.asarray(x)
        kind = ref.weight_kind(w)
        out_f, in_f = _check_features(x, w, f"matmul_many: x[{i}]", i)
        x2 = x.reshape(-1, in_f)
        n = x2.shape[0]
        if kind not in _C_KINDS or not 0 < n <= _small_n(kind):
            out[i] = matmul(x, w)
            continue
        jobs.append((x2, kind) + _stored(w, kind) + (_c_mode(kind, n), w))
        where.append(i)
        shapes.append(x.shape[:-1] + (out_f,))
    if jobs:
        for i, shp, y in zip(where, shapes, _mods["c"].matmul_many(jobs)):
            out[i] = y.reshape(shp)
    return out


# --------------------------------------------------------------- fast twins of the stage definitions
# A stage's NumPy definition lives in its stage file (ops.rms_norm, attention.mla_absorbed, moe.swiglu_sum,
# moe.select_experts); a fast twin is registered here under the definition's dotted name, and a call site
# asks for ``fast(definition)(...)``. A twin is called as twin(definition, *args): it runs the backend's
# kernel when it can and the definition otherwise. The tests hold every twin to its definition.

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
    from ..moe import check_experts          # the definition's checks (the C kernel reads raw rows)
    if len(coefs) != len(experts):
        check_experts(d, experts, coefs)
    setting = act_quant()
    out = []
    for e in experts:
        g, u, dn = e
        got = getattr(g, "_c_expert", None)
        if got is None or got[0] != setting or got[1] is not u or got[2] is not dn:
            check_experts(d, [e], [1.0])
            kind = ref.weight_kind(g)
            if kind not in _C_KINDS or ref.weight_kind(u) != kind or ref.weight_kind(dn) != kind:
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


def _check_heads(x, w, row0: int, stride: int, rows: int, width: int, who: str) -> None:
    """The C path reads raw rows: every head's block must lie inside W and x must be [H, width]."""
    H = x.shape[0] if x.ndim == 2 else -1
    if x.ndim != 2 or x.shape[1] != width:
        raise ValueError(f"{who}: x has shape {list(x.shape)}, expected [heads, {width}]")
    if row0 < 0 or rows < 1 or stride < rows or row0 + (H - 1) * stride + rows > int(w.shape[0]):
        raise ValueError(f"{who}: {H} head blocks of {rows} rows from row {row0} every {stride} rows do not fit "
                         f"in weight {getattr(w, 'name', '')} of {int(w.shape[0])} rows")


def heads_vecmat(x, w, row0: int, stride: int, rows: int) -> np.ndarray:
    """x [H, rows] -> [H, in]: per head h, x[h] @ W[row0 + h*stride : + rows] (W in any stored form).
    The C backend decodes each row once into an accumulator (pk_vecmat_many, heads in parallel, no Python
    object per head); the others use the NumPy twin ref.vecmat on row views."""
    x = np.asarray(x, dtype=np.float32)
    _check_heads(x, w, row0, stride, rows, rows, "heads_vecmat")
    kind = ref.weight_kind(w)
    if backend() == "c" and kind in _C_KINDS:
        return _mods["c"].heads("vecmat", x, kind, *_stored(w, kind), int(w.shape[1]), row0, stride, rows)
    return np.stack([ref.vecmat(x[h], ref.weight_rows(w, row0 + h * stride, row0 + h * stride + rows))
                     for h in range(x.shape[0])])


def heads_matvec(x, w, row0: int, stride: int, rows: int) -> np.ndarray:
    """x [H, in] -> [H, rows]: per head h, W[row0 + h*stride : + rows] @ x[h] -- matmul of one row of x on
    each head's row block (same numerics as matmul, activation quantization included)."""
    x = np.asarray(x, dtype=np.float32)
    _check_heads(x, w, row0, stride, rows, int(w.shape[1]), "heads_matvec")
    kind = ref.weight_kind(w)
    if backend() == "c" and kind in _C_KINDS:
        return _mods["c"].heads("matvec", x, kind, *_stored(w, kind), int(w.shape[1]), row0, stride, rows,
                                _act_mode(kind))
    return np.stack([matmul(x[h], ref.weight_rows(w, row0 + h * stride, row0 + h * stride + rows))
                     for h in range(x.shape[0])])


@twin_of("pykimi.attention.mla_absorbed")
def mla_absorbed(definition, q, kva, ln, eps: float, inv_freq, pos: int, rows: np.ndarray, n: int, kv_b,
                 scale: float, dims, matmul=None) -> np.ndarray:
    """One decode token's absorbed MLA attention in one C call (pk_mla_absorbed: heads in parallel, W_uk /
    W_uv read in the stored form) with the C backend; otherwise the definition."""
    kind = ref.weight_kind(kv_b)
    if backend() == "c" and kind in _C_KINDS and matmul is None:
        from ..attention import check_absorbed    # the definition's checks (the C kernel writes rows[n])
        check_absorbed(q, kva, rows, n, pos, kv_b, dims)
        H, dn, dr, dv, R = (int(d) for d in dims)
        return _mods["c"].mla_absorbed(np.asarray(q, dtype=np.float32).reshape(-1),
                                       np.asarray(kva, dtype=np.float32).reshape(-1), ln, eps, inv_freq, pos,
                                       rows, n, kind, _act_mode(kind), *_owned(kv_b, kind), scale,
                                       (H, dn, dr, dv, R)).reshape(-1)
    return definition(q, kva, ln, eps, inv_freq, pos, rows, n, kv_b, scale, dims, matmul)


# ------------------------------------------------------------------------------ small fused ops

def _nb():
    """The numba module when the active backend wants it, else None."""
    if backend() == "numpy":
        return None
    ok, _ = _probe("numba")
    return _mods["numba"] if ok else None


@twin_of("pykimi.ops.rms_norm")
def rms_norm(definition, x, weight, eps: float) -> np.ndarray:
    """Numba: one pass for the sum of squares (f64), one to write; the definition's rounding otherwise."""
    nb = _nb()
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
    nb = _nb()
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


def softmax(x, axis: int = -1) -> np.ndarray:
    nb = _nb()
    x = np.asarray(x, dtype=np.float32)
    if nb is None or axis not in (-1, x.ndim - 1) or x.size == 0:
        return ref.softmax(x, axis=axis)
    x2 = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty_like(x2)
    nb.softmax(x2, out)
    return out.reshape(x.shape)


def rope_interleaved(x, angles) -> np.ndarray:
    nb = _nb()
    x = np.asarray(x, dtype=np.float32)
    a = np.asarray(angles, dtype=np.float32)
    if nb is None or x.ndim not in (2, 3) or a.ndim != 2 or a.shape != (x.shape[0], x.shape[-1] // 2):
        return ref.rope_interleaved(x, a)
    x3 = np.ascontiguousarray(x if x.ndim == 3 else x[:, None, :])
    out = np.empty_like(x3)
    nb.rope_interleaved(x3, np.ascontiguousarray(a), out)
    return out.reshape(x.shape)


def topk(scores, k: int):
    nb = _nb()
    scores = np.asarray(scores, dtype=np.float32)
    if nb is None or scores.ndim != 2 or not 0 < k <= scores.shape[1]:
        return ref.topk(scores, k)
    n = scores.shape[0]
    ids = np.empty((n, k), dtype=np.int64)
    vals = np.empty((n, k), dtype=np.float32)
    nb.topk(np.ascontiguousarray(scores), int(k), ids, vals)
    return ids, vals


@twin_of("pykimi.moe.select_experts")
def select_experts(definition, logits, bias, rule):
    """The router's selection in one Numba call per batch instead of ~25 NumPy calls -- at 27 layers per
    decoded token that glue was ~0.2 ms a layer."""
    nb = _nb()
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


def group_by_expert(ids, n_experts: int):
    nb = _nb()
    if nb is None:
        return ref.group_by_expert(ids, n_experts)
    flat = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_experts):
        raise ValueError(f"group_by_expert: expert ids must be in [0, {n_experts})")
    order = np.empty(flat.size, dtype=np.int64)
    offsets = np.empty(n_experts + 1, dtype=np.int64)
    nb.group_by_expert(flat, int(n_experts), order, offsets)
    return order, offsets


def gather_rows(x, rows) -> np.ndarray:
    nb = _nb()
    if nb is None:
        return ref.gather_rows(x, rows)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    x2 = x.reshape(x.shape[0], -1)
    out = np.empty((rows.size, x2.shape[1]), dtype=np.float32)
    nb.gather_rows(x2, rows, out)
    return out.reshape((rows.size,) + x.shape[1:])


def scatter_add_weighted(out, rows, y, weights) -> np.ndarray:
    nb = _nb()
    if nb is None or out.dtype != np.float32 or out.ndim != 2 or not out.flags.c_contiguous:
        return ref.scatter_add_weighted(out, rows, y, weights)
    nb.scatter_add_weighted(out, np.ascontiguousarray(rows, dtype=np.int64),
                            np.ascontiguousarray(y, dtype=np.float32),
                            np.ascontiguousarray(weights, dtype=np.float32))
    return out


__all__ = ["parallel_for", "matmul", "matmul_many", "reference", "set_act_quant", "act_quant", "backend", "backends", "set_backend", "set_threads", "get_threads", "rms_norm", "add_rms_norm", "softmax",
           "rope_interleaved", "topk", "route_select", "group_by_expert", "gather_rows", "scatter_add_weighted", "ref",
           "SMALL_N", "TILE_ELEMS", "TASK_ELEMS", "BACKENDS", "widen", "swiglu_sum",
           "swiglu_sum_reference", "mla_absorbed", "mla_absorbed_reference"]
