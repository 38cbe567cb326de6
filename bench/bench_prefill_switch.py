"""Prefill tok/s of one checkpoint with a kernel switch on and off, alternating in one process (best of rounds).

    python bench/bench_prefill_switch.py --ckpt bench/out/synth-L4-q8-all [--switch vnni16] [--lengths 64,128,512]

--switch names a c.set_<switch>_batch function (vnni16: the int16 batch kernel of the default mode's Q8_32; vnni: the
int8 batch kernels). The activation mode is PYKIMI_ACT_QUANT's (default "q4"). Numbers depend on what else runs on
the machine; nothing here is asserted."""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from run import _synthetic_prompt, prefault  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--switch", default="vnni16")
    ap.add_argument("--lengths", default="64,128,512")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import pykimi
    from pykimi.kernels import c
    model = pykimi.load(a.ckpt, threads=a.threads)
    prefault(model.ckpt)
    sw = getattr(c, f"set_{a.switch}_batch")
    lengths = [int(n) for n in a.lengths.split(",")]
    best = {(on, n): float("inf") for on in (True, False) for n in lengths}
    for r in range(a.rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            sw(on)
            for n in lengths:
                prompt = _synthetic_prompt(n, model.text.vocab_size, seed=2)
                model.generate(prompt, max_new_tokens=1, stop_ids=[])
                best[(on, n)] = min(best[(on, n)], model.last_stats["prefill_s"])
    sw(True)
    print(f"{a.ckpt} ({os.environ.get('PYKIMI_ACT_QUANT', 'q4')}), {a.threads} threads, best of {a.rounds}: "
          f"prefill tok/s, {a.switch} off -> on")
    for n in lengths:
        print(f"  {n:4d} tokens: {n / best[(False, n)]:7.1f} -> {n / best[(True, n)]:7.1f}")


if __name__ == "__main__":
    main()
