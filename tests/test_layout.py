"""The tensor table regenerates the released checkpoint's 5679 names and shapes from config.json."""
import json
import os

from pykimi.config import load_config
from pykimi.layout import expected_tensors, is_ignored

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pykimi", "data")


def test_real_tensor_table():
    cfg = load_config(os.path.join(DATA, "reference_config.json"))
    ours = dict(expected_tensors(cfg))
    ref = {k: tuple(v) for k, v in json.load(open(os.path.join(DATA, "tensor_names.json")))["tensors"].items()}
    assert len(ref) == 5679
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    assert not missing and not extra, (missing[:5], extra[:5])
    wrong = [(k, ours[k], ref[k]) for k in ref if ours[k] != ref[k]]
    assert not wrong, wrong[:5]
    assert sum(is_ignored(n) for n in ours) == 27
