"""GOP/s of int8-activation (mode "all") Q4_32 / Q8_32 matmul by rows of x, best of rounds: the int8 batch kernel
(csrc vnni_rows at the AVX-512 level, avx2b_rows with PYKIMI_SIMD=avx2) from C_VNNI_MIN(_AVX2) rows.

    python bench/bench_i8_batch.py [--kinds q4_32,q8_32] [--rows 8,16,...] [--rounds 5] [--json FILE] [--rows-kernels]

For a before / after of two builds, run it alternately with PYTHONPATH on each tree (one process per build: the .so
is loaded once) and keep the best per cell; --json appends one line per (kind, shape, rows) to FILE for that.
Threads: PYKIMI_THREADS / the package default (2 on the benchmark host)."""
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default="q4_32,q8_32")
    ap.add_argument("--rows", default="8,16,32,48,64,128,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", default="1408x2048,2048x1408")
    ap.add_argument("--min-time", type=float, default=0.05)
    ap.add_argument("--json", default="")
    ap.add_argument("--label", default="")
    ap.add_argument("--rows-kernels", action="store_true", help="the batch kernel off (c.set_vnni_batch(False))")
    a = ap.parse_args()
    linear.set_act_quant("all")
    if a.rows_kernels:
        c.set_vnni_batch(False)
    rng = np.random.default_rng(0)
    kinds = a.kinds.split(",")
    rows = [int(n) for n in a.rows.split(",")]
    for shp in a.shapes.split(","):
        out_f, in_f = map(int, shp.split("x"))
        w0 = rng.standard_normal((out_f, in_f)).astype(np.float32)
        ws = {k: (quantize_q4 if k == "q4_32" else quantize_q8)(w0, "w") for k in kinds}
        xs = {n: rng.standard_normal((n, in_f)).astype(np.float32) for n in rows}
        best = {(k, n): float("inf") for k in kinds for n in rows}
        for _ in range(a.rounds):
            for k in kinds:
                for n in rows:
                    x, w = xs[n], ws[k]
                    K.matmul(x, w)
                    reps, t0 = 0, time.perf_counter()
                    while True:
                        K.matmul(x, w)
                        reps += 1
                        dt = time.perf_counter() - t0
                        if dt >= a.min_time:
                            break
                    best[(k, n)] = min(best[(k, n)], dt / reps)
        print(f"[{out_f}, {in_f}] {c.get_simd()}  GOP/s (2 * n * out * in / t), best of {a.rounds} rounds {a.label}")
        print("rows " + " ".join(f"{k:>8}" for k in kinds) + "   plan")
        for n in rows:
            g = {k: 2 * n * out_f * in_f / best[(k, n)] / 1e9 for k in kinds}
            print(f"{n:4d} " + " ".join(f"{g[k]:8.0f}" for k in kinds) + f"   {linear.plan(kinds[0], n)}")
            if a.json:
                with open(a.json, "a") as f:
                    for k in kinds:
                        f.write(json.dumps({"label": a.label, "simd": c.get_simd(), "shape": shp, "kind": k,
                                            "rows": n, "gops": g[k]}) + "\n")


if __name__ == "__main__":
    main()
