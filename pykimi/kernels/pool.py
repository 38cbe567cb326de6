"""The worker threads of the compute-bound paths (prefill, vision): parallel_for with BLAS single-threaded.

Prefill and vision go through BLAS (DESIGN.md "Memory and speed"). Instead of one big multi-threaded BLAS
call per product, they cut the work into tasks (weight row tiles, token chunks, heads) that get_threads()
Python threads take one at a time, each calling BLAS single-threaded: NumPy's BLAS and ufuncs release the GIL,
and dynamic taking balances the cores when one is shared with another process (see linear._matmul_tiled).
NumPy's OpenBLAS is switched to one thread only while such tasks run.
"""
from __future__ import annotations

import ctypes
import glob
import itertools
import os
import threading

import numpy as np

from .probe import get_threads

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
