"""Write a Kimi-VL checkpoint with the REAL config and shapes (27 layers, 64 experts, ...) and random weights,
streaming tensor by tensor with a progress bar, after checking free disk.

    python bench/make_synthetic.py OUT_DIR [--layers N] [--dtype BF16|F32] [--seed S]

``--layers N`` keeps the real widths but only N decoder layers (layer 0 dense, the rest MoE).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pykimi.config import KimiVLConfig  # noqa: E402
from pykimi.layout import expected_tensors, stored_dtype  # noqa: E402
from pykimi.testing import reference_config, write_random_checkpoint  # noqa: E402
from pykimi.weights import DTYPES  # noqa: E402


def planned_bytes(config: dict, dtype: str) -> int:
    cfg = KimiVLConfig.from_dict(config)
    total = 0
    for n, s in expected_tensors(cfg):
        k = 1
        for d in s:
            k *= d
        total += k * DTYPES[stored_dtype(n, dtype)].itemsize
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the real 27)")
    ap.add_argument("--vision-layers", type=int, default=None, help="vision blocks (default: the real 27)")
    ap.add_argument("--dtype", default="BF16", choices=["BF16", "F32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = ap.parse_args(argv)

    over = {} if args.layers is None else {"num_hidden_layers": args.layers}
    config = reference_config(**over)
    if args.vision_layers is not None:
        config["vision_config"]["num_hidden_layers"] = args.vision_layers
    need = planned_bytes(config, args.dtype)
    parent = os.path.dirname(os.path.abspath(args.out)) or "."
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    print(f"checkpoint: {need / 1e9:.2f} GB ({args.dtype}); free disk at {parent}: {free / 1e9:.1f} GB")
    if need * 1.02 + (1 << 30) > free:
        print(f"error: not enough free disk: need {need / 1e9:.1f} GB + 1 GB headroom, have {free / 1e9:.1f} GB",
              file=sys.stderr)
        return 2
    if os.path.exists(os.path.join(args.out, "config.json")) and not args.force:
        print(f"error: {args.out} already holds a checkpoint (use --force)", file=sys.stderr)
        return 2
    write_random_checkpoint(args.out, config, dtype=args.dtype, seed=args.seed,
                            shard_bytes=int(args.shard_gb * (1 << 30)), progress=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
