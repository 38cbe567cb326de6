"""Prefill tok/s of one checkpoint with the build on PYTHONPATH (best of rounds), for before / after runs of two
builds: run it alternately with PYTHONPATH on each tree (one process per build) and keep the best per length.

    python bench/bench_prefill_build.py --ckpt bench/out/synth-L4-q4-all [--lengths 64,128,512] [--json FILE]

The activation mode is PYKIMI_ACT_QUANT's (default "q4"), the level PYKIMI_SIMD's. Nothing here is asserted."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _synthetic_prompt, prefault  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--lengths", default="64,128,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    import pykimi
    from pykimi.kernels import c
    model = pykimi.load(a.ckpt, threads=a.threads)
    prefault(model.ckpt)
    lengths = [int(n) for n in a.lengths.split(",")]
    best = {n: float("inf") for n in lengths}
    for _ in range(a.rounds):
        for n in lengths:
            prompt = _synthetic_prompt(n, model.text.vocab_size, seed=2)
            model.generate(prompt, max_new_tokens=1, stop_ids=[])
            best[n] = min(best[n], model.last_stats["prefill_s"])
    print(f"{a.ckpt} ({os.environ.get('PYKIMI_ACT_QUANT', 'q4')}, {c.get_simd()}), {a.threads} threads, best of "
          f"{a.rounds}: prefill tok/s {a.label}")
    for n in lengths:
        print(f"  {n:4d} tokens: {n / best[n]:7.1f}")
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps({"label": a.label, "simd": c.get_simd(), "tokens": n, "tok_s": n / best[n]}) + "\n")


if __name__ == "__main__":
    main()
