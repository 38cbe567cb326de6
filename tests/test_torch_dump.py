"""Another engine's dump compares the same way: transformers' DeepseekV3 (forward hooks, tools/torch_dump.py)
agrees with pykimi and with the golden tensors, and `pykimi diff` reads its file."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.reference  # an optional reference tool (.ci/run re-runs these)

pytest.importorskip("torch", reason="torch not installed (optional reference tool)")
pytest.importorskip("transformers", reason="transformers not installed (optional reference tool)")

import pykimi  # noqa: E402
from conftest import GOLDEN, ROOT, TINY  # noqa: E402
from pykimi.debug import compare, golden_tolerances  # noqa: E402
from pykimi.weights import Checkpoint  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tools"))
from torch_dump import torch_lm_dump  # noqa: E402


@pytest.mark.parametrize("case", ["text_only", "two_images"])
def test_torch_dump_agrees_with_pykimi_and_golden(case, tmp_path):
    d = os.path.join(GOLDEN, case)
    inp = Checkpoint.open(os.path.join(d, "inputs.safetensors"))
    ids = np.array(inp.get("input_ids"))
    feats = None
    if "pixel_values" in inp:
        feats = Checkpoint.open(os.path.join(d, "golden.safetensors")).f32("multi_modal_projector")
    dump = torch_lm_dump(TINY, ids, feats)
    tols = golden_tolerances(d)
    rep = compare(dump, d, tolerances=tols)
    print(rep.format())
    assert rep.ok and len(rep.rows) >= 3 * 3 + 3
    model = pykimi.load(TINY)
    with pykimi.trace(model) as t:
        model.forward(ids, image_features=feats)
    rep = compare(t, dump, rel_tol=2e-5)
    print(rep.format())
    assert rep.ok and "language_model.model.layers.2.mlp" in [r.name for r in rep.rows]
    # the command line reads the other engine's file
    p = str(tmp_path / "torch.safetensors")
    from pykimi.weights import save_file

    save_file(dump, p)
    r = subprocess.run([sys.executable, "-m", "pykimi.cli", "diff", p, d], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert r.returncode == 0 and "all compared tensors agree" in r.stdout, r.stdout + r.stderr
