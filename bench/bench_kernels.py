"""Micro-benchmark of the decode GEMV kernels at the model's real shapes.

For each shape and stored form (bf16, q8_32, q4_32) it times y = x @ W.T for one token (and optionally a
small batch) through pykimi.kernels.matmul with the active backend, against NumPy widen + matmul, and
reports GB/s of STORED weight bytes read, next to the machine's memory bandwidth (a large np.sum, and a
np.copyto counted as read + write). Small matrices are cycled over enough copies to exceed the caches,
as decode does (every expert matrix is touched once per token).

    python bench/bench_kernels.py [--threads N] [--backend c|numba|numpy] [--quick] [--batch 4]
    python bench/bench_kernels.py --quick --no-numpy --simd all     # C SIMD levels side by side

With --simd LEVELS (comma-separated from scalar, avx2, avx512, or "all") the C kernels are timed at each level
in the same process, in alternating rounds (best round kept), so a busy neighbour slows every level alike and
the ratio between levels stays meaningful.

Numbers depend on what else runs on the machine; nothing here is asserted.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pykimi.kernels as K  # noqa: E402
from pykimi.kernels import ref  # noqa: E402
from pykimi.quant import Q4Weight, Q8Weight  # noqa: E402
from pykimi.weights import Stored  # noqa: E402

# (label, out, in): an expert's down_proj, kv_b_proj, the lm_head
SHAPES = [("expert down 2048x1408", 2048, 1408), ("expert up 1408x2048", 1408, 2048),
          ("kv_b 4096x512", 4096, 512), ("lm_head 163840x2048", 163840, 2048)]
MIN_BYTES = 256 << 20  # cycle over copies until the working set is this large (beats the caches)


def timeit(fn, min_time=0.3, max_reps=50):
    fn()  # warm (JIT, page faults)
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_time or reps >= max_reps:
            return dt / reps


def bandwidth(nbytes=1 << 30):
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    b[:] = 0  # fault the pages in before timing
    t_sum = timeit(lambda: a.sum(), 0.5, 10)
    t_copy = timeit(lambda: np.copyto(b, a), 0.5, 10)
    return a.nbytes / t_sum / 1e9, 2 * a.nbytes / t_copy / 1e9


def make_weights(kind, out_f, in_f, copies, rng):
    nb = -(-in_f // 32)
    ws = []
    for c in range(copies):
        if kind == "bf16":
            # random bf16 bits in a sane range (|w| ~ 2^-8 .. 2^-5), any sign; generating f32 first is slow
            bits = rng.integers(0x3B80, 0x3D00, size=(out_f, in_f), dtype=np.uint16)
            bits |= (rng.integers(0, 2, size=(out_f, in_f), dtype=np.uint16) << 15)
            ws.append(Stored(f"w{c}", "BF16", bits))
        elif kind == "q8":
            ws.append(Q8Weight(f"w{c}", (out_f, in_f), rng.integers(-127, 128, (out_f, in_f), dtype=np.int8),
                               rng.uniform(1e-4, 1e-3, (out_f, nb)).astype(np.float32)))
        else:
            ws.append(Q4Weight(f"w{c}", (out_f, in_f), rng.integers(0, 256, (out_f, -(-in_f // 2)), dtype=np.uint8),
                               rng.uniform(1e-4, 1e-3, (out_f, nb)).astype(np.float32)))
    return ws


def timeit_levels(fn, levels, rounds=5, min_time=0.1):
    """{level: seconds per call of fn}: alternating rounds over the SIMD levels, the best round of each."""
    from pykimi.kernels import c
    best = {lvl: float("inf") for lvl in levels}
    try:
        for _ in range(rounds):
            for lvl in levels:
                c.set_simd(lvl)
                best[lvl] = min(best[lvl], timeit(fn, min_time, 50))
    finally:
        c.set_simd(None)
    return best


def parse_levels(spec):
    """--simd value -> list of C SIMD levels (None = just the current one, not switched)."""
    if not spec:
        return [None]
    from pykimi.kernels import c
    have = c.simd_levels()
    levels = have if spec == "all" else [v.strip() for v in spec.split(",") if v.strip()]
    for lvl in levels:
        if lvl not in have:
            raise SystemExit(f"--simd: level {lvl!r} not available here (have {', '.join(have)})")
    return levels


def stored_bytes(w):
    return w.data.nbytes if isinstance(w, Stored) else w.nbytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--batch", type=int, default=0, help="also time n=BATCH rows of x")
    ap.add_argument("--quick", action="store_true", help="skip the lm_head and use a smaller working set")
    ap.add_argument("--moe-only", action="store_true", help="only the MoE decode-layer test")
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy widen+matmul baseline")
    ap.add_argument("--moe-layers", type=int, default=8, help="distinct MoE layers in the decode-step test")
    ap.add_argument("--act-quant", default=None, help="q4 (default) | all | none (see kernels.set_act_quant)")
    ap.add_argument("--simd", default=None, help="C SIMD levels side by side: 'all' or e.g. 'avx2,avx512'")
    ap.add_argument("--forms", default="bf16,q8,q4", help="weight forms to time (default bf16,q8,q4)")
    args = ap.parse_args()
    if args.backend:
        K.set_backend(args.backend)
    if args.threads:
        K.set_threads(args.threads)
    if args.act_quant:
        K.set_act_quant(args.act_quant)
    if args.simd and K.backend() != "c":
        raise SystemExit("--simd needs the C backend")
    levels = parse_levels(args.simd)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    global MIN_BYTES
    if args.quick:
        MIN_BYTES = 96 << 20
    rng = np.random.default_rng(0)
    print(f"pykimi kernels: backend={K.backend()} threads={K.get_threads()} cpus={os.cpu_count()} "
          f"act_quant={K.act_quant()} load={os.getloadavg()[0]:.1f}")
    info = K.backends()
    if info["c"]["available"]:
        print(f"  C: {info['c']['simd']} (levels here: {', '.join(info['c']['simd_levels'])}), "
              f"openmp={info['c']['openmp']}")
    bw_sum, bw_copy = bandwidth(256 << 20 if args.quick else 1 << 30)
    print(f"memory bandwidth: read (np.sum) {bw_sum:.1f} GB/s, copy (read+write) {bw_copy:.1f} GB/s\n")
    ns = [1] + ([args.batch] if args.batch else [])
    if levels != [None]:
        return by_level(args, rng, bw_sum, levels, ns, forms)
    hdr = f"{'shape':24s} {'form':5s} {'n':>3s} {'MB':>8s} {'pykimi ms':>10s} {'GB/s':>7s} {'%bw':>5s} " \
          f"{'numpy ms':>9s} {'GB/s':>7s} {'speedup':>8s}"
    print(hdr)
    print("-" * len(hdr))
    for label, out_f, in_f in ([] if args.moe_only else SHAPES):
        if args.quick and out_f > 100000:
            continue
        for kind in forms:
            ws, copies, total = weights_for(kind, out_f, in_f, rng)
            for n in ns:
                x = rng.standard_normal((n, in_f)).astype(np.float32)
                t = timeit(lambda: [K.matmul(x, w) for w in ws]) / copies
                gbs = stored_bytes(ws[0]) / t / 1e9
                if args.no_numpy:
                    tn, gbn = float("nan"), float("nan")
                else:
                    m = ws[: max(1, min(copies, 8))]
                    tn = timeit(lambda: [x @ w.f32().T for w in m], 0.3, 5) / len(m)
                    gbn = stored_bytes(ws[0]) / tn / 1e9
                print(f"{label:24s} {kind:5s} {n:3d} {total / copies / 1e6:8.1f} {t * 1e3:10.3f} {gbs:7.1f} "
                      f"{100 * gbs / bw_sum:5.0f} {tn * 1e3:9.3f} {gbn:7.1f} {tn / t:7.1f}x", flush=True)
            del ws
    moe_step(args, rng, bw_sum)


def weights_for(kind, out_f, in_f, rng):
    """Enough copies of one random [out_f, in_f] weight to exceed the caches: (weights, copies, total bytes)."""
    one = {"bf16": 2 * out_f * in_f, "q8": out_f * in_f + 4 * out_f * (-(-in_f // 32)),
           "q4": out_f * (-(-in_f // 2)) + 4 * out_f * (-(-in_f // 32))}[kind]
    copies = max(1, min(64, MIN_BYTES // one))
    ws = make_weights(kind, out_f, in_f, copies, rng)
    return ws, copies, sum(stored_bytes(w) for w in ws)


def by_level(args, rng, bw_sum, levels, ns, forms):
    """The shapes table with one GB/s column per C SIMD level, timed in alternating rounds."""
    hdr = f"{'shape':24s} {'form':5s} {'n':>3s} {'MB':>6s} " + " ".join(f"{lvl + ' GB/s':>12s}" for lvl in levels) \
        + f" {'%bw':>5s} {levels[-1] + '/' + levels[0]:>12s}"
    print(hdr)
    print("-" * len(hdr))
    for label, out_f, in_f in ([] if args.moe_only else SHAPES):
        if args.quick and out_f > 100000:
            continue
        for kind in forms:
            ws, copies, total = weights_for(kind, out_f, in_f, rng)
            for n in ns:
                x = rng.standard_normal((n, in_f)).astype(np.float32)
                ts = timeit_levels(lambda: [K.matmul(x, w) for w in ws], levels)
                gbs = {lvl: total / ts[lvl] / 1e9 for lvl in levels}
                print(f"{label:24s} {kind:5s} {n:3d} {total / copies / 1e6:6.1f} "
                      + " ".join(f"{gbs[lvl]:12.1f}" for lvl in levels)
                      + f" {100 * max(gbs.values()) / bw_sum:5.0f} {gbs[levels[-1]] / gbs[levels[0]]:11.2f}x",
                      flush=True)
            del ws
    moe_step(args, rng, bw_sum, levels, forms)


def moe_step(args, rng, bw_sum, levels=(None,), forms=("bf16", "q8", "q4")):
    """One MoE layer of a decode step at the real widths: 6 routed experts + the shared expert (2816 wide),
    gate+up then down, per-matrix matmul calls vs matmul_many (one C call / fork-join per phase)."""
    D, I, S, k = 2048, 1408, 2816, 6
    print(f"\nMoE decode layer (k={k} experts of {I} + shared {S}, D={D}), {args.moe_layers} distinct layers:")
    if list(levels) != [None]:
        print(f"{'form':5s} {'MB/layer':>9s} " + " ".join(f"{lvl + ' many GB/s':>17s}" for lvl in levels)
              + f" {levels[-1] + '/' + levels[0]:>12s}")
    else:
        print(f"{'form':5s} {'MB/layer':>9s} {'matmul ms':>10s} {'GB/s':>6s} {'many ms':>8s} {'GB/s':>6s}")
    for kind in forms:
        layers = []
        for _ in range(args.moe_layers):
            gate = make_weights(kind, I, D, k, rng) + make_weights(kind, S, D, 1, rng)
            up = make_weights(kind, I, D, k, rng) + make_weights(kind, S, D, 1, rng)
            down = make_weights(kind, D, I, k, rng) + make_weights(kind, D, S, 1, rng)
            layers.append((gate, up, down))
        nbytes = sum(stored_bytes(w) for w in layers[0][0] + layers[0][1] + layers[0][2])
        x = rng.standard_normal((1, D)).astype(np.float32)

        def one_by_one():
            for gate, up, down in layers:
                hs = [K.matmul(x, g) * K.matmul(x, u) for g, u in zip(gate, up)]
                for h, d in zip(hs, down):
                    K.matmul(h, d)

        def batched():
            for gate, up, down in layers:
                gu = K.matmul_many([x] * (2 * len(gate)), gate + up)
                hs = [a * b for a, b in zip(gu[:len(gate)], gu[len(gate):])]
                K.matmul_many(hs, down)

        if list(levels) != [None]:
            ts = timeit_levels(batched, levels)
            gbs = {lvl: nbytes * len(layers) / ts[lvl] / 1e9 for lvl in levels}
            print(f"{kind:5s} {nbytes / 1e6:9.1f} " + " ".join(f"{gbs[lvl]:17.1f}" for lvl in levels)
                  + f" {gbs[levels[-1]] / gbs[levels[0]]:11.2f}x", flush=True)
            del layers
            continue
        t1 = timeit(one_by_one) / len(layers)
        t2 = timeit(batched) / len(layers)
        print(f"{kind:5s} {nbytes / 1e6:9.1f} {t1 * 1e3:10.3f} {nbytes / t1 / 1e9:6.1f} {t2 * 1e3:8.3f} "
              f"{nbytes / t2 / 1e9:6.1f}", flush=True)
        del layers


if __name__ == "__main__":
    main()
