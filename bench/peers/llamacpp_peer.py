"""llama.cpp peer through llama-cpp-python, on a GGUF written by bench/peers/gguf_export.py from the same
synthetic weights. Token ids are fed directly (the GGUF's vocabulary is a placeholder).

Decode: greedy, one ``eval([token])`` per step after the prompt, timed per step after a warm-up generation.
Prefill: ``eval(prompt)`` of n tokens from an empty cache (logits of the last position only), n_batch = n.
Weights stay in llama.cpp's plain CPU buffers (no AMX / REPACK extra buffer types; see _load).
"""
from __future__ import annotations

import os
import time

import numpy as np


def unavailable() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:
        return f"llama-cpp-python not importable ({type(e).__name__}: {e})".splitlines()[0]
    try:
        import gguf  # noqa: F401
    except Exception as e:
        return f"the gguf package is not importable ({type(e).__name__}: {e})".splitlines()[0]
    return None


def _load(path: str, threads: int, n_ctx: int, n_batch: int, extra_bufts: bool = False, mlock: bool = False):
    """A Llama context. ``extra_bufts=False`` keeps every weight in the plain CPU buffer: on this machine
    llama.cpp's AMX buffer type (chosen automatically for Q8_0/Q4_0 weights on AMX CPUs) aborts in the
    scheduler or segfaults on this model; the flag also turns off llama.cpp's REPACK layouts. ``mlock``: its
    --mlock (the mapped weights pinned in RAM; its REPACK copies are anonymous memory, resident anyway)."""
    import llama_cpp
    from llama_cpp import Llama

    lib = llama_cpp.llama_cpp
    default = lib.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    lib.llama_model_default_params = params          # Llama() reads its model params from this function
    try:
        return Llama(model_path=path, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                     n_threads_batch=threads, logits_all=False, use_mmap=True, use_mlock=mlock, verbose=False,
                     seed=0)
    finally:
        lib.llama_model_default_params = default


def _last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated position (llama-cpp-python keeps ``scores`` only with logits_all)."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))


def _greedy(llm, prompt, n_new: int):
    """Prompt then n_new greedy tokens; returns (seconds per decode step, ids)."""
    llm.reset()
    llm.eval(list(map(int, prompt)))
    ids = [int(np.argmax(_last_logits(llm)))]
    steps = []
    for _ in range(n_new - 1):
        t = time.perf_counter()
        llm.eval([ids[-1]])
        ids.append(int(np.argmax(_last_logits(llm))))
        steps.append(time.perf_counter() - t)
    return np.array(steps), ids


def run(spec: dict) -> dict:
    if spec.get("path"):                              # a separately built llama-cpp-python (pip --target DIR)
        import sys
        sys.path.insert(0, spec["path"])
    why = unavailable()
    if why:
        return {"skipped": why}
    import llama_cpp

    from run import _synthetic_prompt

    T = spec["threads"]
    n_max = max(spec["prefill"] + [spec["prompt"] + spec["tokens"] + spec["warmup"] + 8])
    t0 = time.perf_counter()
    extra = bool(spec.get("extra_bufts", False))
    llm = _load(spec["gguf"], T, n_ctx=max(1024, n_max + 16), n_batch=max(spec["prefill"] + [64]), extra_bufts=extra,
                mlock=bool(spec.get("mlock", False)))
    out = {"version": llama_cpp.__version__, "load_s": time.perf_counter() - t0, "threads": T, "extra_bufts": extra,
           "mlock": bool(spec.get("mlock", False)),
           "library": os.path.dirname(llama_cpp.__file__)}
    vocab = llm.n_vocab()
    prompt = _synthetic_prompt(spec["prompt"], vocab)
    _greedy(llm, prompt, spec["warmup"] + 1)
    steps, ids = _greedy(llm, prompt, spec["tokens"] + 1)
    out.update(decode_tok_s=float(len(steps) / steps.sum()), decode_ms=float(1e3 * steps.mean()),
               decode_ms_median=float(1e3 * np.median(steps)),
               decode_ms_p99=float(1e3 * np.percentile(steps, 99)), token_ids=ids)
    out["prefill"] = {}
    for n in spec["prefill"]:
        ids_n = list(map(int, _synthetic_prompt(n, vocab, seed=2)))
        best = None
        for _ in range(2):
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids_n)
            dt = time.perf_counter() - t
            best = dt if best is None else min(best, dt)
        out["prefill"][str(n)] = {"seconds": best, "tok_s": n / best}
    return out
