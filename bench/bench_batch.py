"""images/s of a batch job (pykimi.batch) with --parallel 1 (model.generate, one image at a time) against
--parallel N (pykimi.engine: N sequences per decode step), in one process, alternating, on the same images.

    python bench/bench_batch.py                                   # the demo checkpoint
    python bench/bench_batch.py --checkpoint bench/out/synth-L4 --size 448   # 4-layer real width (make_synthetic.py)

A synthetic checkpoint has no tokenizer: the bench gives it a stand-in ``tiktoken.model`` with the real id
layout (163 584 base ids, the 256 special ids after them, so <|media_pad|> is the config's placeholder id) in a
folder of symlinks; the prompt then tokenizes to different (but as many as a few words make) ids, which is
irrelevant to speed. Random weights rarely pick a stop id, so every row runs ``-n`` tokens with stops off
(``--ignore-eos``, default on for synthetic checkpoints).

The machine is shared and noisy: each configuration runs ``--rounds`` times alternating with the others, and
every sample is printed with the load average beside it; read medians, not single runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pykimi  # noqa: F401,E402 -- before NumPy, as the `pykimi` command does (OPENBLAS_THREAD_TIMEOUT)
import numpy as np  # noqa: E402


def with_tokenizer(ckpt: str, tmp: str) -> str:
    """``ckpt`` itself when it has a tiktoken.model; else a folder of symlinks to it plus a stand-in vocabulary."""
    if os.path.exists(os.path.join(ckpt, "tiktoken.model")):
        return ckpt
    from pykimi.tokenizer import write_tiktoken_model

    with open(os.path.join(ckpt, "config.json")) as fh:
        cfg = json.load(fh)
    vocab = (cfg.get("text_config") or cfg).get("vocab_size")
    n_base = vocab - 256
    d = os.path.join(tmp, "ckpt")
    os.makedirs(d)
    for f in os.listdir(ckpt):
        os.symlink(os.path.join(os.path.abspath(ckpt), f), os.path.join(d, f))
    ranks = {bytes([b]): b for b in range(256)}
    i = 256
    for a in range(256):                      # filler tokens (never merged into: BPE picks them only if seen)
        for b in range(256):
            for c in range(3):
                if i == n_base:
                    break
                ranks[bytes([a, b]) + b"\x00" * c] = i
                i += 1
    assert i == n_base, (i, n_base)
    write_tiktoken_model(os.path.join(d, "tiktoken.model"), ranks)
    return d


def make_images(folder: str, n: int, size: int | None, seed: int = 0) -> None:
    from pykimi.scenes import random_scene

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = random_scene(rng)[0]
        if size:
            img = img.resize((size, size))
        img.save(os.path.join(folder, f"img_{i:03d}.png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", action="append", help="checkpoint dir (repeatable; default: the demo)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="resize the scenes to SIZE x SIZE (default: as drawn)")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ignore-eos", action="store_true", default=None)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", help="write the samples here")
    args = ap.parse_args(argv)

    import pykimi
    from pykimi.batch import Settings, make_runner, read_jobs
    from pykimi.processor import Processor

    ckpts = args.checkpoint or [pykimi.demo_checkpoint()]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        imgs = os.path.join(tmp, "imgs")
        make_images(imgs, args.images, args.size)
        for ck in ckpts:
            synthetic = not os.path.exists(os.path.join(ck, "tiktoken.model"))
            ignore = args.ignore_eos if args.ignore_eos is not None else synthetic
            path = with_tokenizer(ck, os.path.join(tmp, os.path.basename(ck.rstrip("/"))))
            opts = {"threads": args.threads} if args.threads else {}
            t0 = time.perf_counter()
            model = pykimi.load(path, **opts)
            proc = Processor.from_pretrained(path)
            print(f"{ck}: loaded in {time.perf_counter() - t0:.1f} s; {args.images} images"
                  f"{f' at {args.size} px' if args.size else ''}, -n {args.max_new_tokens}"
                  f"{' (stops off)' if ignore else ''}", flush=True)
            settings = Settings(max_new_tokens=args.max_new_tokens, stop_ids=() if ignore else None)
            jobs = read_jobs(imgs)
            list(make_runner(model, proc, settings, 1).run(jobs[:1]))          # warm-up: JIT, page cache
            texts = {}
            samples = {p: [] for p in args.parallel}
            for r in range(args.rounds):
                for p in args.parallel:
                    load1 = os.getloadavg()[0]
                    t0 = time.perf_counter()
                    rows = list(make_runner(model, proc, settings, p).run(jobs))
                    dt = time.perf_counter() - t0
                    toks = sum(row.get("completion_tokens", 0) for row in rows)
                    errs = [row for row in rows if "error" in row]
                    assert not errs, errs[:2]
                    texts.setdefault(p, {row["id"]: row["text"] for row in rows})
                    samples[p].append(len(rows) / dt)
                    print(f"  round {r} --parallel {p}: {len(rows) / dt:6.3f} images/s  {toks / dt:7.1f} tok/s  "
                          f"({dt:.1f} s, load avg {load1:.1f})", flush=True)
            same = all(texts[p] == texts[args.parallel[0]] for p in args.parallel)
            med = {p: statistics.median(v) for p, v in samples.items()}
            base = med[args.parallel[0]]
            print(f"  median images/s: " + ", ".join(f"--parallel {p}: {m:.3f} ({m / base:.2f}x)"
                                                    for p, m in med.items())
                  + f"; greedy rows identical across --parallel: {same}", flush=True)
            results.append({"checkpoint": ck, "images": args.images, "size": args.size,
                            "max_new_tokens": args.max_new_tokens, "stops_off": ignore,
                            "samples_images_per_s": samples, "median": med, "identical": same,
                            "threads": args.threads, "cpus": os.cpu_count()})
            del model
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
