"""The full-size (27-layer) int8 / int4 decode against llama.cpp Q8_0 / Q4_0 on the same synthetic weights,
on a disk too small to hold the bf16 original beside every copy.

    python bench/full_size_quant.py                 # every step whose output is missing, then the runs
    python bench/full_size_quant.py --drop          # also delete each input once nothing else needs it

Sizes (real widths, 27 layers): bf16 32.8 GB, int8 repack 17.4 GB, Q8_0 GGUF 17.4 GB, int4 repack and Q4_0
GGUF ~9.3 GB each. ``bench/run.py --layers 27`` would want them all at once (~90 GB). Here each pair is
made from the previous copy and, with ``--drop``, the previous copy is deleted as soon as it is no longer
needed, so the peak is the bf16 original plus the int8 repack (~50 GB):

  1. int8 repack of the bf16 checkpoint (pykimi.quant, ``--what all``)            -> synth-L27-q8-all
  2. Q8_0 GGUF from the int8 repack: Q8_0 is the same block of 32 with scale max/127, so llama.cpp holds
     the same codes (the block scale rounded to f16)                                -> synth-L27-q8_0.gguf
  3. decode, pykimi int8 vs llama.cpp Q8_0
  4. int4 repack re-quantized from the int8 repack, and the Q4_0 GGUF from the int4 repack (Q4_0 and pykimi's
     Q4_32 both take scale = the block's signed max / -8, so again the same codes)
  5. decode, pykimi int4 vs llama.cpp Q4_0

Both engines decode from a warm page cache: before each run its file is read once (the 17 GB int8 pair does
not fit in memory twice, so the two runs of a pair go one after the other, each warming its own file).
The bound is the bytes of weights one token reads (bench/run.py's rule, per engine's own file) over the
machine bandwidth measured in the same run. Results: bench/out/results-L27-quant.{json,md}.

``--rounds R`` repeats each pair's runs R times, pykimi and llama.cpp alternating, and samples the bandwidth
(bench/bandwidth.py, 4 reads of 2 GiB) right before every engine run: each run's share of the bound uses the
sample taken seconds before it. Why: on the shared hosts the read bandwidth moved between ~45 and ~85 GB/s
within minutes, so a bound measured once per pair said more about the minute than about the engine. The
table reports the median over the rounds (ratio, tok/s, shares) with the range.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import run  # noqa: E402  (bench/run.py: the workers, the machine description, the checkpoint helpers)

OUT = run.OUT


def warm(path: str) -> float:
    """Read every file under ``path`` once (into the page cache); returns seconds."""
    t0 = time.perf_counter()
    files = [path] if os.path.isfile(path) else [os.path.join(path, f) for f in sorted(os.listdir(path))]
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0


def repack(src: str, dst: str, bits: int, size: float) -> None:
    """size: the repack's size as a fraction of the source's (bf16 -> int8 and int8 -> int4 ~0.53, bf16 -> int4
    ~0.28, int4 -> int8 ~1.9), for the free-disk check."""
    if os.path.exists(os.path.join(dst, "config.json")):
        return
    run.check_disk(run.dir_bytes(src) * size, dst)
    print(f"[full] repacking {src} -> {dst} (int{bits}, all)", flush=True)
    code = ("import sys; sys.path.insert(0, %r); from pykimi.quant import quantize_checkpoint; "
            "print(quantize_checkpoint(%r, %r, bits=%d, what='all', overwrite=True))" % (run.ROOT, src, dst, bits))
    subprocess.run([sys.executable, "-c", code], check=True)


def gguf(src: str, path: str, kind: str) -> None:
    if os.path.exists(path):
        return
    from peers import gguf_export
    run.check_disk(run.dir_bytes(src) * 1.02, path)
    print(f"[full] writing {path} from {src}", flush=True)
    gguf_export.export(src, path, kind)


def drop(path: str, enabled: bool) -> None:
    if enabled and os.path.exists(path):
        print(f"[full] deleting {path}", flush=True)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=os.path.join(OUT, "synth-L27"), help="the bf16 27-layer checkpoint")
    ap.add_argument("--drop", action="store_true", help="delete each input once nothing else needs it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--modes", default="int8,int4")
    ap.add_argument("--llamacpp-extra-bufts", action="store_true",
                    help="llama.cpp with its default extra buffer types (REPACK, AMX where built), as its users run "
                         "it; off by default only because its AMX buffer crashed on this model on the AMX machine")
    ap.add_argument("--rounds", type=int, default=1,
                    help="runs per engine, alternating, each after its own bandwidth sample (medians reported)")
    ap.add_argument("--mlock", action="store_true",
                    help="both engines pin their mapped weights in RAM (pykimi --mlock, llama.cpp use_mlock): no "
                         "page-cache reclaim during the runs (RESULTS.md 'Page cache and --mlock')")
    ap.add_argument("--prepare-only", action="store_true", help="only make the checkpoints and GGUFs, time nothing")
    ap.add_argument("--out", default=os.path.join(OUT, "results-L27-quant.json"))
    args = ap.parse_args(argv)
    from peers import gguf_export, llamacpp_peer

    why = None if args.prepare_only else llamacpp_peer.unavailable()
    if why:
        print(f"error: the llama.cpp peer is needed for this comparison: {why}", file=sys.stderr)
        return 2
    q8, q4 = args.src.rstrip("/") + "-q8-all", args.src.rstrip("/") + "-q4-all"
    g8, g4 = args.src.rstrip("/") + "-q8_0.gguf", args.src.rstrip("/") + "-q4_0.gguf"
    modes = args.modes.split(",")
    res = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv), "threads": args.threads,
           "machine": run.machine(), "load_start": run.load_now(), "pairs": {}}
    T = args.threads

    def pair(mode: str, ckpt: str, gg: str) -> dict:
        if args.prepare_only:
            return {"pykimi": {"path": ckpt}, "llamacpp": {"path": gg}}
        out = {"pykimi": {"path": ckpt, "active_bytes": run.active_bytes_per_token(ckpt)},
               "llamacpp": {"path": gg, "active_bytes": gguf_export.active_bytes_per_token(gg)}}
        rounds = []
        for k in range(max(1, args.rounds)):
            rd = {}
            for who, path in (("pykimi", ckpt), ("llamacpp", gg)):
                warm_s = warm(path)
                bw = run.run_worker({"kind": "bandwidth", "repeat": 4 if args.rounds > 1 else 8, "threads": T})
                if who == "pykimi":
                    r = run.run_worker({"kind": "decode", "label": f"L27-decode-{mode}", "ckpt": ckpt, "threads": T,
                                        "prompt": 16, "tokens": args.tokens, "warmup": args.warmup,
                                        "prefault": True, "mlock": args.mlock})
                    tok = r.get("tok_s")
                else:
                    r = run.run_worker({"kind": "llamacpp", "label": f"L27-llamacpp-{mode}", "gguf": gg, "threads": T,
                                        "prompt": 16, "tokens": args.tokens, "warmup": args.warmup, "prefill": [],
                                        "path": "", "extra_bufts": args.llamacpp_extra_bufts,
                                        "mlock": args.mlock})
                    tok = r.get("decode_tok_s")
                one = {"warm_s": warm_s, "run": r, "bandwidth": bw, "tok_s": tok}
                if tok and bw.get("gbs"):
                    one["bound_tok_s"] = bw["gbs"] * 1e9 / out[who]["active_bytes"]["total"]
                    one["fraction_of_bound"] = tok / one["bound_tok_s"]
                rd[who] = one
            a, b = rd["pykimi"]["tok_s"], rd["llamacpp"]["tok_s"]
            rd["ratio"] = a / b if a and b else None
            print(f"[full] {mode} round {k + 1}: pykimi {a} tok/s ({rd['pykimi'].get('fraction_of_bound')}), "
                  f"llama.cpp {b} tok/s ({rd['llamacpp'].get('fraction_of_bound')})", flush=True)
            rounds.append(rd)
        out["rounds"] = rounds
        for who in ("pykimi", "llamacpp"):
            out[who]["run"] = rounds[-1][who]["run"]
            for key in ("tok_s", "fraction_of_bound", "bound_tok_s"):
                out[who][key], out[who][key + "_range"] = _median_range([rd[who].get(key) for rd in rounds])
        samples = [rd[w]["bandwidth"].get("gbs") for rd in rounds for w in ("pykimi", "llamacpp")]
        out["bandwidth"] = {"gbs": _median_range(samples)[0], "samples_gbs": samples}
        out["ratio"], out["ratio_range"] = _median_range([rd["ratio"] for rd in rounds])
        a, b = out["pykimi"]["tok_s"], out["llamacpp"]["tok_s"]
        print(f"[full] {mode}: pykimi {a} tok/s, llama.cpp {b} tok/s, ratio {out['ratio']}", flush=True)
        return out

    if "int8" in modes:
        have_src = os.path.exists(os.path.join(args.src, "config.json"))
        if not os.path.exists(os.path.join(q8, "config.json")):
            if have_src:
                repack(args.src, q8, 8, 0.6)
            else:
                # The bf16 original is gone (dropped by an int4 run): re-quantize the int4 repack to int8. The
                # values then have 16 levels a block, which changes neither engine's speed, and the Q8_0 GGUF
                # is written from this int8 repack, so both still read the same codes.
                repack(q4, q8, 8, 1.9)
                if "int4" not in modes:
                    drop(q4, args.drop)
                    drop(g4, args.drop)
        drop(args.src, args.drop)
        gguf(q8, g8, "q8_0")
        res["pairs"]["int8"] = pair("int8", q8, g8)
        _save(res, args.out)
        drop(g8, args.drop)
    if "int4" in modes:
        if not os.path.exists(os.path.join(q4, "config.json")):
            # from the int8 repack when there is one, else straight from the bf16 original (--modes int4 on a
            # disk without room for the int8 copy)
            from_q8 = os.path.exists(os.path.join(q8, "config.json"))
            repack(q8 if from_q8 else args.src, q4, 4, 0.6 if from_q8 else 0.32)
        drop(q8, args.drop)
        drop(args.src, args.drop)
        gguf(q4, g4, "q4_0")
        res["pairs"]["int4"] = pair("int4", q4, g4)
    res["load_end"] = run.load_now()
    _save(res, args.out)
    return 0


def _median_range(vals) -> tuple:
    """(median, [min, max]) of the values that are not None; (None, None) when there are none."""
    v = sorted(x for x in vals if x is not None)
    if not v:
        return None, None
    mid = v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2
    return mid, [v[0], v[-1]]


def _save(res: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    lines = ["| mode | pykimi tok/s | of its bound | llama.cpp tok/s | of its bound | pykimi / llama.cpp "
             "| bandwidth |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for mode, p in res["pairs"].items():
        a, b = p["pykimi"], p["llamacpp"]

        def f(d, key, fmt, unit=""):
            x, r = d.get(key), d.get(key + "_range")
            if x is None:
                return "n/a"
            span = f" ({format(r[0], fmt)}-{format(r[1], fmt)})" if r and r[0] != r[1] else ""
            return format(x, fmt) + unit + span
        lines.append(f"| {mode} | {f(a, 'tok_s', '.2f')} | {f(a, 'fraction_of_bound', '.1%')} | "
                     f"{f(b, 'tok_s', '.2f')} | {f(b, 'fraction_of_bound', '.1%')} | {f(p, 'ratio', '.2f', 'x')} | "
                     f"{f(p.get('bandwidth', {}), 'gbs', '.1f')} GB/s |")  # none with --prepare-only
    with open(os.path.splitext(path)[0] + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
