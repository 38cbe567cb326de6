"""pykimi's kernels: fast twins of the NumPy stage definitions, and the products every stage uses.

    probe.py      which backend runs ("c", "numba", "numpy"), threads          backend(), set_backend(), ...
    pool.py       worker threads for the compute-bound paths, BLAS one-thread  parallel_for()
    linear.py     x @ W.T in any stored form, the crossover table as data      matmul(), matmul_many(), widen(),
                                                                               heads_vecmat(), heads_matvec(),
                                                                               reference(), set_act_quant()
    fused.py      registered fast twins of stage definitions                   fast(definition), twins()
    ref.py        NumPy twins of the weight decodings and the matmul variants (what linear.reference uses)
    numba_kernels.py, c.py    the kernels themselves (Numba; csrc/ through cffi)

A stage calls ``kernels.fast(rms_norm)(x, w, eps)`` for the fast version of its definition (the definition
itself when no twin applies) and ``kernels.matmul(x, w)`` for a linear layer.
"""
from . import ref  # noqa: F401
from .fused import fast, twin_of, twins
from .linear import (MEASURED_SMALL_N_ACT, SMALL_N, SMALL_N_ACT, TASK_ELEMS, act_quant, heads_matvec,  # noqa: F401
                     heads_vecmat, matmul, matmul_many, plan, reference, set_act_quant, widen)
from .pool import parallel_for
from .probe import BACKENDS, backend, backends, get_threads, set_backend, set_threads

__all__ = ["BACKENDS", "backend", "backends", "set_backend", "get_threads", "set_threads", "parallel_for",
           "matmul", "matmul_many", "widen", "heads_vecmat", "heads_matvec", "reference", "plan", "set_act_quant",
           "act_quant", "SMALL_N", "TASK_ELEMS", "fast", "twin_of", "twins", "ref"]
