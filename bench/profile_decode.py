"""Where a decode token's time goes outside the kernels (issue 25, item 4: "Python glue <= 2 ms per token").

    python bench/profile_decode.py CKPT_DIR [--tokens 32] [--threads 2] [--cprofile 4] [--json OUT] [--layers 27]
                                   [--batch B] [--mlock]

For N greedy decode tokens after a short prompt (with --batch B >= 2: N steps of the serve engine's batched
decode, engine.decode_batch, over B sequences with their own prompts; the numbers are per step):
  * step      ms per token, timed with nothing patched (mean / median / p99);
  * kernels   ms per token inside the kernel calls, timed in a second pass with every cffi ``lib.pk_*`` function,
              every Numba kernel and every BLAS product (kernels.matmul on an ndarray weight) wrapped in a
              perf_counter accumulator -- reported per function (calls and ms per token);
  * glue      step - kernels of that instrumented pass, per token and per decoder layer (the wrappers add
              ~0.2 us a call, counted as glue);
  * the top Python costs of a few steps under cProfile (tottime: the function's own time);
  * with --stalls, a third pass that keeps, for every step, what else happened in it: page faults (minor / major),
              context switches (voluntary / involuntary), the process's CPU seconds (all threads), the guest's steal
              time (/proc/stat, what the host took from this VM), and Python's garbage collections; then lists the
              steps slower than 1.3x the median (issue 25's p99 limit) beside the typical step's counts, so a stall
              can be told apart: faults (pages not resident), steal (the host), a collection (Python), or none.

Nothing here is a test. Run it with the pykimi under test first on PYTHONPATH (a side-by-side comparison runs
this same file against two worktrees): ``PYTHONPATH=/path/to/tree python bench/profile_decode.py ...``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time

import pykimi  # noqa: F401 -- before NumPy, as the `pykimi` command does (OPENBLAS_THREAD_TIMEOUT)
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import clock_ticks, prefault, steal_ticks  # noqa: E402  (bench/run.py)


class Clock:
    """perf_counter accumulators per kernel name, and the wrappers that feed them."""

    def __init__(self):
        self.t: dict = {}
        self.n: dict = {}
        self.on = False

    def wrap(self, name: str, fn):
        t, n = self.t, self.n
        t.setdefault(name, 0.0)
        n.setdefault(name, 0)
        pc = time.perf_counter

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t0 = pc()
            try:
                return fn(*a, **k)
            finally:
                t[name] += pc() - t0
                n[name] += 1
        timed.__wrapped__ = fn
        return timed

    def reset(self):
        for k in self.t:
            self.t[k] = 0.0
            self.n[k] = 0

    def total(self) -> float:
        return sum(self.t.values())


class _TimedLib:
    """Stands in for a cffi ``lib``: every pk_* function timed, everything else passed through."""

    def __init__(self, lib, clock: Clock):
        self._lib, self._clock, self._fns = lib, clock, {}

    def __getattr__(self, name):
        f = self._fns.get(name)
        if f is None:
            f = getattr(self._lib, name)
            if name.startswith("pk_") and callable(f) and not name.startswith(("pk_get_", "pk_set_", "pk_simd",
                                                                               "pk_has_", "pk_amx")):
                f = self._clock.wrap(name, f)
            self._fns[name] = f
        return f


def instrument(clock: Clock) -> None:
    """Wrap the kernels where the stage code looks them up (module attributes), so the model runs unchanged."""
    import pykimi.kernels as K
    from pykimi.kernels import linear, probe
    c = probe._mods.get("c")
    if c is not None:
        c.lib = _TimedLib(c.lib, clock)
    nb = probe.numba_module()
    if nb is not None:
        from numba.core.registry import CPUDispatcher
        for name in dir(nb):
            f = getattr(nb, name)
            if isinstance(f, CPUDispatcher):
                setattr(nb, name, clock.wrap(f"numba.{name}", f))
    # BLAS: kernels.matmul on an ndarray weight (the f32 router) is one x @ W.T -- kernel time, not glue
    inner = linear.matmul
    blas = clock.wrap("blas.matmul", inner)

    def matmul(x, w):
        return blas(x, w) if isinstance(w, np.ndarray) else inner(x, w)
    for mod in (K, linear):
        mod.matmul = matmul
    import pykimi.moe as moe_mod
    import pykimi.attention as att_mod
    import pykimi.model as model_mod
    for mod in (moe_mod, att_mod, model_mod):       # they call kernels.matmul through the package
        assert getattr(mod, "kernels", K) is K


def deepen(model, n_layers: int) -> None:
    """Run the checkpoint's layers as a stack of n_layers (layer i >= L reuses the weights of layer
    1 + (i - 1) % (L - 1), a MoE layer, under its own index: its own cache rows and fused-call record), so the
    glue of a 27-layer token is measured on a 4-layer checkpoint: the per-layer Python and the cold data it
    meets after each layer's weight stream are the real ones; memory stays that of L layers (the weights are
    shared; their bytes are read once per use, as in a real stack, but may hit the page cache more)."""
    import dataclasses
    L = model.text.num_hidden_layers
    if n_layers <= L:
        return
    if L < 2:
        raise SystemExit("--layers needs a checkpoint with a MoE layer after layer 0")
    model.text = dataclasses.replace(model.text, num_hidden_layers=n_layers)
    base, kept = model.layer_weights, {}

    def layer_weights(i):
        w = kept.get(i)
        if w is None:
            w = kept[i] = base(i) if i < L else dataclasses.replace(base(1 + (i - 1) % (L - 1)), layer=i)
        return w
    model.layer_weights = layer_weights


def decode(model, prompt: np.ndarray, n: int):
    """Prefill the prompt, then n greedy tokens; per-token step seconds."""
    cache = model.new_cache(capacity=prompt.size + n + 1)
    logits = model.prefill(model.embed(prompt), cache, all_logits=False)
    tok = int(np.argmax(logits))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = model.decode_step(tok, cache)
        times.append(time.perf_counter() - t0)
        tok = int(np.argmax(logits))
    return np.asarray(times)


class Batch:
    """--batch B: B sequences (prompts of different lengths) decoded together by engine.decode_batch; the same
    interface as :func:`decode` (per-step seconds), so the passes below run either."""

    def __init__(self, model, prompt: np.ndarray, B: int):
        from pykimi.engine import decode_batch
        self.decode_batch, self.B = decode_batch, B
        self.prompts = [np.roll(prompt, b)[: max(4, prompt.size - b)] for b in range(B)]

    def start(self, model, n: int):
        caches = []
        for p in self.prompts:
            c = model.new_cache(capacity=p.size + n + 1)
            model.prefill(model.embed(p), c, all_logits=False)
            caches.append(c)
        toks = [int(100 + 7 * b) for b in range(self.B)]
        return caches, toks

    def step(self, model, state):
        caches, toks = state
        logits = self.decode_batch(model, toks, caches)
        state[1][:] = [int(i) for i in np.argmax(logits, axis=1)]
        return logits

    def __call__(self, model, prompt, n):
        state = self.start(model, n)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.step(model, state)
            times.append(time.perf_counter() - t0)
        return np.asarray(times)


class Single:
    """One sequence through model.decode_step (the default)."""

    def __init__(self, prompt: np.ndarray):
        self.prompt = prompt

    def start(self, model, n: int):
        cache = model.new_cache(capacity=self.prompt.size + n + 1)
        logits = model.prefill(model.embed(self.prompt), cache, all_logits=False)
        return [cache, int(np.argmax(logits))]

    def step(self, model, state):
        logits = model.decode_step(state[1], state[0])
        state[1] = int(np.argmax(logits))
        return logits


class Stalls:
    """Per-step counters beside the step's wall time (--stalls): what a slow step had that a typical one did not."""

    FIELDS = ("ms", "cpu_ms", "minflt", "majflt", "nvcsw", "nivcsw", "steal_ms", "gc")

    def __init__(self):
        import gc
        self.gcs = 0
        gc.callbacks.append(self._gc)
        self.rows: list = []

    def _gc(self, phase, info):
        if phase == "start":
            self.gcs += 1

    @staticmethod
    def _sample():
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF)
        return (time.perf_counter(), r.ru_utime + r.ru_stime, r.ru_minflt, r.ru_majflt, r.ru_nvcsw, r.ru_nivcsw,
                steal_ticks())

    def run(self, model, run, n: int) -> None:
        tick = clock_ticks()
        state = run.start(model, n)
        for _ in range(n):
            g0, a = self.gcs, self._sample()
            run.step(model, state)
            b = self._sample()
            self.rows.append(((b[0] - a[0]) * 1e3, (b[1] - a[1]) * 1e3, b[2] - a[2], b[3] - a[3], b[4] - a[4],
                              b[5] - a[5], (b[6] - a[6]) * 1e3 / tick, self.gcs - g0))

    def report(self, limit: float = 1.3) -> dict:
        a = np.asarray(self.rows, dtype=np.float64)                 # [steps, FIELDS]
        med = np.median(a, axis=0)
        slow = a[:, 0] > limit * med[0]
        out = {"median": dict(zip(self.FIELDS, map(float, med))), "limit": limit, "slow_steps": int(slow.sum()),
               "slow": [dict(zip(("step",) + self.FIELDS, (int(i),) + tuple(map(float, a[i]))))
                        for i in np.flatnonzero(slow)]}
        print(f"  stalls: {int(slow.sum())} of {len(a)} steps above {limit}x the median step "
              f"({med[0]:.2f} ms)")
        head = "    step " + " ".join(f"{k:>8s}" for k in self.FIELDS)
        print(head)
        print("  median " + " ".join(f"{v:8.1f}" for v in med))
        for i in np.flatnonzero(slow):
            print(f"    {i:4d} " + " ".join(f"{v:8.1f}" for v in a[i]))
        return out


def stats(a_ms: np.ndarray) -> dict:
    return {"mean": float(a_ms.mean()), "median": float(np.median(a_ms)), "p99": float(np.percentile(a_ms, 99)),
            "min": float(a_ms.min())}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cprofile", type=int, default=4, help="steps under cProfile (0: none)")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--json", default=None, help="write the numbers here too")
    ap.add_argument("--quiet", action="store_true", help="only the summary lines")
    ap.add_argument("--batch", type=int, default=1,
                    help="B >= 2: steps of engine.decode_batch over B sequences (numbers per step)")
    ap.add_argument("--mlock", action="store_true", help="load with mlock=True (the weights pinned in RAM)")
    ap.add_argument("--layers", type=int, default=0,
                    help="run the checkpoint's layers as a deeper stack of this many (see deepen)")
    ap.add_argument("--prefault", action="store_true",
                    help="touch every language-model weight page first (bench/run.py's prefault, as its decode does)")
    ap.add_argument("--stalls", action="store_true",
                    help="a pass that keeps each step's faults, context switches, steal time and collections")
    args = ap.parse_args(argv)

    import pykimi
    model = pykimi.load(args.ckpt, backend="c", threads=args.threads, mlock=args.mlock)
    deepen(model, args.layers)
    if args.prefault:
        prefault(model.ckpt)
    L = model.text.num_hidden_layers
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, min(model.text.vocab_size, 50000), args.prompt).astype(np.int64)
    run = Batch(model, prompt, args.batch) if args.batch > 1 else Single(prompt)
    decode = run if args.batch > 1 else globals()["decode"]
    # pre-fault the mapped weights and compile everything once
    decode(model, prompt, args.warmup)

    step = decode(model, prompt, args.tokens) * 1e3                        # nothing patched
    stall = None
    if args.stalls:                                                        # before any wrapper is installed
        stall = Stalls()
        stall.run(model, run, args.tokens)

    if args.cprofile:
        pstate = run.start(model, args.cprofile)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.cprofile):
            run.step(model, pstate)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(args.top)
        cprof = s.getvalue()

    clock = Clock()
    instrument(clock)
    decode(model, prompt, 2)                                               # wrappers warm
    state = run.start(model, args.tokens)
    inst, kern = [], []
    per_fn_t = {k: 0.0 for k in clock.t}
    for _ in range(args.tokens):
        clock.reset()
        clock.on = True
        t0 = time.perf_counter()
        run.step(model, state)
        dt = time.perf_counter() - t0
        clock.on = False
        inst.append(dt * 1e3)
        kern.append(clock.total() * 1e3)
        for k, v in clock.t.items():
            per_fn_t[k] = per_fn_t.get(k, 0.0) + v
        per_fn_n = dict(clock.n)                                           # calls per token (same every step)
    inst, kern = np.asarray(inst), np.asarray(kern)
    glue = inst - kern

    res = {"ckpt": os.path.abspath(args.ckpt), "layers": L, "threads": args.threads, "tokens": args.tokens,
           "batch": args.batch,
           "pykimi": os.path.dirname(os.path.abspath(pykimi.__file__)),
           "step_ms": stats(step), "instrumented_step_ms": stats(inst), "kernel_ms": stats(kern),
           "glue_ms": stats(glue), "glue_ms_per_layer": float(glue.mean() / L),
           "kernels": {k: {"calls_per_token": per_fn_n.get(k, 0), "ms_per_token": v * 1e3 / args.tokens}
                       for k, v in sorted(per_fn_t.items(), key=lambda kv: -kv[1]) if per_fn_n.get(k, 0)}}

    if args.cprofile:
        res["cprofile_top"] = cprof
    f = lambda d: f"mean {d['mean']:.2f}  median {d['median']:.2f}  p99 {d['p99']:.2f}"   # noqa: E731
    print(f"{args.ckpt}: {L} layers, {args.threads} threads, {args.tokens} "
          f"{'tokens' if args.batch == 1 else f'steps of batch {args.batch} (ms per step)'} ({res['pykimi']})")
    print(f"  step         ms/token  {f(res['step_ms'])}")
    print(f"  instrumented ms/token  {f(res['instrumented_step_ms'])}")
    print(f"  kernels      ms/token  {f(res['kernel_ms'])}")
    print(f"  glue         ms/token  {f(res['glue_ms'])}   ({res['glue_ms_per_layer']:.3f} ms a layer)")
    if stall is not None:
        res["stalls"] = stall.report()
    if not args.quiet:
        print("  kernel calls per token:")
        for k, v in res["kernels"].items():
            print(f"    {k:28s} {v['calls_per_token']:4d} calls  {v['ms_per_token']:8.3f} ms")
        if args.cprofile:
            print(f"  cProfile, {args.cprofile} steps (tottime):")
            print(cprof)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return res


if __name__ == "__main__":
    main()
