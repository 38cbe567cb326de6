"""GOP/s of default-mode ("q4": Q8_32 x int16 activations) Q8 matmul by rows of x, 2 threads, best of rounds.

    python bench/bench_q8_batch.py [--rows 1,2,4,...] [--rounds 5] [--modes today,row,vnni16]

Modes: "old" = linear.matmul with the int16 batch kernel off (c.set_vnni16_batch(False): today's plan -- the row
kernel, the exact f32 batch kernel, widened tiles + sgemm), "new" = linear.matmul with it on; "row" = c.matmul_q8w
with it off (the int16 row kernel at every n), "batch" = c.matmul_q8w with it on (from csrc PK_VNNI16_MIN_Q8 rows:
build with -DPK_VNNI16_MIN_Q8=1 to force it onto every n). Alternating rounds, best kept (the host is shared)."""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pykimi.kernels as K  # noqa: E402
from pykimi.kernels import c, linear  # noqa: E402
from pykimi.quant import Q8Weight  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,6,8,12,16,24,32,64,128,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--modes", default="old,new")
    ap.add_argument("--shapes", default="1408x2048,2048x1408")
    ap.add_argument("--min-time", type=float, default=0.05)
    a = ap.parse_args()
    linear.set_act_quant("q4")
    rng = np.random.default_rng(0)
    modes = a.modes.split(",")
    has16 = hasattr(c, "set_vnni16_batch")
    for shp in a.shapes.split(","):
        out_f, in_f = map(int, shp.split("x"))
        nb = -(-in_f // 32)
        w = Q8Weight("w", (out_f, in_f), rng.integers(-127, 128, (out_f, in_f), dtype=np.int8),
                     rng.uniform(1e-4, 1e-3, (out_f, nb)).astype(np.float32))
        print(f"[{out_f}, {in_f}]  GOP/s (2 * n * out * in / t), best of {a.rounds} rounds")
        print("rows " + " ".join(f"{m:>8}" for m in modes) + "   plan")
        for n in map(int, a.rows.split(",")):
            x = rng.standard_normal((n, in_f)).astype(np.float32)
            best = {m: float("inf") for m in modes}
            for _ in range(a.rounds):
                for m in modes:
                    if m in ("old", "new"):
                        fn = lambda: K.matmul(x, w)  # noqa: E731
                    else:
                        fn = lambda: c.matmul_q8w(x, w.q, w.scales)  # noqa: E731
                    if has16:
                        c.set_vnni16_batch(m not in ("row", "old"))
                    fn()
                    reps, t0 = 0, time.perf_counter()
                    while True:
                        fn()
                        reps += 1
                        dt = time.perf_counter() - t0
                        if dt >= a.min_time:
                            break
                    best[m] = min(best[m], dt / reps)
            if has16:
                c.set_vnni16_batch(True)
            print(f"{n:4d} " + " ".join(f"{2 * n * out_f * in_f / best[m] / 1e9:8.0f}" for m in modes)
                  + f"   {linear.plan('q8_32', n)}")   # with the kernel on


if __name__ == "__main__":
    main()
