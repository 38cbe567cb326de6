"""GOP/s of quantized (or bf16) matmul by rows of x (the batch kernels' crossovers), best of alternating rounds.

    python bench/bench_batch_kernels.py --kinds q8_32 --mode q4 --switch vnni16     # the int16 batch kernel off / on
    python bench/bench_batch_kernels.py --kinds q4_32,q8_32 --mode all --rows 8,16,32,64,128,512 [--json FILE]
    PYKIMI_SIMD=avx2 python bench/bench_batch_kernels.py --kinds bf16 --mode none     # the exact bf16 product

Each cell is 2 * n * out * in / t of ``kernels.matmul`` (the plan linear.py picks for n rows in activation mode
--mode: "q4" the default, "all", "none"), best of --rounds rounds, every configuration once per round in turn (the
host is shared: a busy minute slows them alike). --switch NAME also times the same calls with c.set_NAME_batch off
(vnni: the int8 batch kernels; vnni16: the int16 ones), alternating in the same process. --direct calls the C job
itself (c.matmul_many at the mode's activation for the format) instead of the plan: with the switch off that is the
row kernels at every n, and a build with -DPK_VNNI16_MIN_Q8=1 (or PK_AVX2W_MIN_Q8, PK_VNNI_MIN_*, PK_AVX2B_MIN_*)
forces a batch kernel onto few rows (PYKIMI_SIMD=avx2 for the AVX2 ones).
For two builds, run it alternately with PYTHONPATH on each tree (one process per build: the .so is loaded once) and
keep the best per cell; --json appends one line per (kind, shape, rows, switch) to FILE for that. Threads:
PYKIMI_THREADS / the package default. Nothing here is asserted."""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pykimi.kernels as K  # noqa: E402
from pykimi.kernels import c, linear  # noqa: E402
from pykimi.quant import quantize_q4, quantize_q8  # noqa: E402
from pykimi.weights import Stored, f32_to_bf16  # noqa: E402


def _weight(kind: str, w0: np.ndarray):
    """w0 in the stored form `kind` ("bf16": the bits as a Stored tensor)."""
    if kind == "bf16":
        return Stored("w", "BF16", f32_to_bf16(w0))
    return (quantize_q4 if kind == "q4_32" else quantize_q8)(w0, "w")


def best_time(fn, min_time: float) -> float:
    """Seconds a call, over as many calls as fill min_time (after one untimed call)."""
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / reps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", default="q4_32,q8_32")
    ap.add_argument("--mode", default="q4", help="activation mode (kernels.set_act_quant): q4 | all | none")
    ap.add_argument("--rows", default="1,2,4,6,8,12,16,24,32,48,64,128,512")
    ap.add_argument("--shapes", default="1408x2048,2048x1408")
    ap.add_argument("--switch", default="", help="also with c.set_<SWITCH>_batch(False): vnni | vnni16")
    ap.add_argument("--direct", action="store_true", help="the C job at the mode's activation, not the plan")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--json", default="")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    K.set_backend("c")
    linear.set_act_quant(a.mode)
    rng = np.random.default_rng(0)
    kinds = a.kinds.split(",")
    rows = [int(n) for n in a.rows.split(",")]
    switch = getattr(c, f"set_{a.switch}_batch") if a.switch else None
    states = (True, False) if switch else (True,)
    for shp in a.shapes.split(","):
        out_f, in_f = map(int, shp.split("x"))
        w0 = rng.standard_normal((out_f, in_f)).astype(np.float32)
        ws = {k: _weight(k, w0) for k in kinds}
        xs = {n: rng.standard_normal((n, in_f)).astype(np.float32) for n in rows}
        best = {(k, n, s): float("inf") for k in kinds for n in rows for s in states}
        for _ in range(a.rounds):
            for s in states:
                if switch:
                    switch(s)
                for k in kinds:
                    act = linear._act_mode(k)
                    for n in rows:
                        x, w = xs[n], ws[k]
                        cj = (x, k, w.data, None, act) if k == "bf16" else (x, k, w.q, w.scales, act)
                        fn = ((lambda: c.matmul_many([cj])) if a.direct  # noqa: E731
                              else (lambda: K.matmul(x, w)))                                      # noqa: E731
                        best[(k, n, s)] = min(best[(k, n, s)], best_time(fn, a.min_time))
        if switch:
            switch(True)
        cols = [(k, s) for k in kinds for s in states]
        head = " ".join(f"{k + ('' if not switch else (' on' if s else ' off')):>12}" for k, s in cols)
        print(f"[{out_f}, {in_f}] {c.get_simd()} mode {a.mode}{' direct' if a.direct else ''}  GOP/s "
              f"(2 * n * out * in / t), best of {a.rounds} rounds {a.label}")
        print(f"rows {head}   plan")
        for n in rows:
            g = {(k, s): 2 * n * out_f * in_f / best[(k, n, s)] / 1e9 for k, s in cols}
            print(f"{n:4d} " + " ".join(f"{g[col]:12.0f}" for col in cols) + f"   {linear.plan(kinds[0], n)}")
            if a.json:
                with open(a.json, "a") as f:
                    for (k, s), v in g.items():
                        f.write(json.dumps({"label": a.label, "simd": c.get_simd(), "mode": a.mode, "shape": shp,
                                            "kind": k, "rows": n, "switch": a.switch, "on": s, "gops": v}) + "\n")


if __name__ == "__main__":
    main()
