"""Memory is a feature: opening a checkpoint and reading one tensor costs anonymous memory proportional to
that tensor, not to the file (weights stay memory-mapped; the page cache is file-backed, not anonymous)."""
import gc
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import gc, sys, numpy as np
    sys.path.insert(0, {root!r})
    from pykimi.weights import Checkpoint, SafetensorsWriter, Stored

    def anon():
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                return int(line.split()[1]) * 1024

    path = {path!r}
    rows, cols = 40, 1 << 20            # 40 tensors of 1M bf16 values (2 MB each) + one 240 MB tensor
    with SafetensorsWriter(path) as w:
        w.plan([("big", "BF16", (120, cols))] + [(f"t{{i}}", "BF16", (1, cols)) for i in range(rows)])
        blk = np.full((8, cols), 0x3F80, np.uint16)        # 1.0 in bf16
        w.write_parts("big", (blk for _ in range(15)))
        for i in range(rows):
            w.write(f"t{{i}}", Stored(f"t{{i}}", "BF16", np.full((1, cols), 0x4000 + i, np.uint16)))
    del blk
    gc.collect()
    a0 = anon()
    ck = Checkpoint.open(path)
    raw = ck.get("big")                  # zero-copy view: touching it pages in file-backed memory only
    s = float(raw[::7, ::4096].astype(np.float64).sum())
    x = ck.f32("t3")                     # one 4 MB float32 copy
    a1 = anon()
    print(a1 - a0, x.nbytes, int(raw.nbytes), s)
""")


def test_anonymous_memory_stays_at_working_set(tmp_path):
    path = str(tmp_path / "big.safetensors")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=ROOT, path=path)], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grew, tensor_bytes, big_bytes, _ = out.stdout.split()
    grew, tensor_bytes, big_bytes = int(grew), int(tensor_bytes), int(big_bytes)
    file_size = os.path.getsize(path)
    print(f"file {file_size / 1e6:.0f} MB, read tensor {tensor_bytes / 1e6:.1f} MB, anon growth {grew / 1e6:.1f} MB")
    assert file_size > 300e6
    # one f32 copy (4 MB) plus interpreter noise; far below the 240 MB tensor we scanned or the file
    assert grew <= 3 * tensor_bytes + 4e6, grew
