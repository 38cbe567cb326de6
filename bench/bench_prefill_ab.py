"""Prefill tok/s of one checkpoint, best of rounds: a kernel switch on and off in one process, or the build as it is.

    python bench/bench_prefill_ab.py --ckpt bench/out/synth-L4-q8-all --switch vnni16 [--lengths 64,128,512]
    python bench/bench_prefill_ab.py --ckpt bench/out/synth-L4-q4-all [--json FILE --label old]

--switch NAME alternates c.set_NAME_batch(True / False) round by round (vnni16: the int16 batch kernel of the default
mode's Q8_32; vnni: the int8 batch kernels). Without it, the build on PYTHONPATH is timed as it is: for two builds,
run it alternately with PYTHONPATH on each tree and keep the best per length (--json appends one line per length).
The activation mode is PYKIMI_ACT_QUANT's (default "q4"), the level PYKIMI_SIMD's. Nothing here is asserted."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _synthetic_prompt, prefault  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--switch", default="", help="c.set_<SWITCH>_batch on / off alternating: vnni16 | vnni")
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
    sw = getattr(c, f"set_{a.switch}_batch") if a.switch else None
    states = (True, False) if sw else (True,)
    lengths = [int(n) for n in a.lengths.split(",")]
    best = {(on, n): float("inf") for on in states for n in lengths}
    for r in range(a.rounds):
        for on in (states if r % 2 == 0 else states[::-1]):
            if sw:
                sw(on)
            for n in lengths:
                prompt = _synthetic_prompt(n, model.text.vocab_size, seed=2)
                model.generate(prompt, max_new_tokens=1, stop_ids=[])
                best[(on, n)] = min(best[(on, n)], model.last_stats["prefill_s"])
    if sw:
        sw(True)
    what = f"{a.switch} off -> on" if sw else a.label
    print(f"{a.ckpt} ({os.environ.get('PYKIMI_ACT_QUANT', 'q4')}, {c.get_simd()}), {a.threads} threads, best of "
          f"{a.rounds}: prefill tok/s {what}")
    for n in lengths:
        tps = {on: n / best[(on, n)] for on in states}
        print(f"  {n:4d} tokens: " + (f"{tps[False]:7.1f} -> {tps[True]:7.1f}" if sw else f"{tps[True]:7.1f}"))
        if a.json:
            with open(a.json, "a") as f:
                for on, v in tps.items():
                    f.write(json.dumps({"label": a.label, "simd": c.get_simd(), "switch": a.switch, "on": on,
                                        "tokens": n, "tok_s": v}) + "\n")


if __name__ == "__main__":
    main()
