#!/usr/bin/env python
"""Exact-match accuracy of a demo checkpoint on fresh shapes scenes (issue 7).

Draws ``--images`` scenes with ``numpy.random.default_rng(--seed)`` (``pykimi.scenes``;
the default seed 2026 is not used in training: training draws from seed 0, its progress
checks from seed 99), asks every question of ``scenes.qa_pairs`` through the chat
template, decodes greedily and compares the answer with the exact expected string.

    python tools/eval_demo.py                    # pykimi's greedy decoding (what counts)
    python tools/eval_demo.py --torch            # the training tool's torch model on the
                                                 # exported bf16 weights (needs torch)
    python tools/eval_demo.py --show-errors 10 --json result.json

Prints accuracy by question type (count / color / describe) and overall.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from pykimi import scenes  # noqa: E402

TYPES = ("count", "color", "describe")


def default_checkpoint() -> str:
    try:
        import pykimi
        return pykimi.demo_checkpoint()
    except (ImportError, AttributeError):
        return os.path.join(ROOT, "pykimi", "demo")


class PykimiAnswerer:
    """Answers with pykimi's public API (DESIGN.md): load, Processor, generate(temperature=0)."""

    def __init__(self, path: str, max_new_tokens: int):
        import pykimi
        self.model = pykimi.load(path)
        self.proc = pykimi.Processor.from_pretrained(path)
        self.stop = set(int(i) for i in self.proc.stop_ids)
        self.max_new = max_new_tokens

    def answers(self, img, questions):
        out = []
        for q in questions:
            text = self.proc.apply_chat_template(scenes.messages_for(q), add_generation_prompt=True)
            inputs = self.proc(text=text, images=[img])
            ids = self.model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"],
                                      max_new_tokens=self.max_new, temperature=0.0)
            out.append(self.proc.decode([int(i) for i in ids if int(i) not in self.stop]))
        return out


class TorchAnswerer:
    """The torch twin from tools/train_demo.py on the exported weights (greedy, no cache)."""

    def __init__(self, path: str, max_new_tokens: int, threads: int):
        import torch
        torch.set_num_threads(threads)
        sys.path.insert(0, os.path.join(ROOT, "tools"))
        import train_demo as td
        self.td, self.torch = td, torch
        self.model, self.tok, _ = td.load_exported(path)
        self.max_new = max_new_tokens

    def answers(self, img, questions):
        td = self.td
        patches, grid = td.preprocess(img)
        with self.torch.no_grad():
            feats = self.model.encode_images([self.torch.from_numpy(patches)], [grid])
        n_tok = (grid[0] // 2) * (grid[1] // 2)
        return [td.greedy_answer(self.model, self.tok, td.prompt_ids(self.tok, q, n_tok), feats, self.max_new)
                for q in questions]


def evaluate(answerer, seed: int, n_images: int, show_errors: int = 0, progress: bool = True):
    rng = np.random.default_rng(seed)
    right, total = collections.Counter(), collections.Counter()
    errors = []
    t0 = time.time()
    for i in range(n_images):
        img, shapes = scenes.random_scene(rng)
        qa = scenes.qa_pairs(shapes)
        got = answerer.answers(img, [q for q, _, _ in qa])
        for (q, want, qtype), ans in zip(qa, got):
            total[qtype] += 1
            if ans == want:
                right[qtype] += 1
            else:
                errors.append({"image": i, "question": q, "expected": want, "got": ans})
        if progress and (i + 1) % 50 == 0:
            print(f"  {i + 1}/{n_images} images, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    result = {t: {"correct": right[t], "total": total[t], "accuracy": right[t] / max(1, total[t])} for t in TYPES}
    n_all = sum(total.values())
    result["all"] = {"correct": sum(right.values()), "total": n_all, "accuracy": sum(right.values()) / max(1, n_all)}
    for e in errors[:show_errors]:
        print(f"  image {e['image']}: {e['question']!r} expected {e['expected']!r} got {e['got']!r}")
    return result, errors


def main(argv=None):
    ap = argparse.ArgumentParser(description="Exact-match accuracy of the demo checkpoint by question type.")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled demo)")
    ap.add_argument("--seed", type=int, default=2026, help="scene seed (not used in training)")
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--torch", action="store_true", help="evaluate the torch twin instead of pykimi")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared box)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--show-errors", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args(argv)

    path = args.model or default_checkpoint()
    answerer = (TorchAnswerer(path, args.max_new_tokens, args.threads) if args.torch
                else PykimiAnswerer(path, args.max_new_tokens))
    engine = "torch (tools/train_demo.py twin)" if args.torch else "pykimi"
    t0 = time.time()
    result, _ = evaluate(answerer, args.seed, args.images, args.show_errors)
    print(f"{engine} greedy exact match, {args.images} images, seed {args.seed}, {path}")
    print(f"{'type':10s} {'correct':>8s} {'total':>6s} {'accuracy':>9s}")
    for t in TYPES + ("all",):
        r = result[t]
        print(f"{t:10s} {r['correct']:8d} {r['total']:6d} {100 * r['accuracy']:8.1f}%")
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine": engine, "seed": args.seed, "images": args.images, "result": result}, f, indent=1)


if __name__ == "__main__":
    main()
