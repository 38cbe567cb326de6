"""bench/peers/gguf_export: the GGUF the llama.cpp peer reads, written from a bf16 checkpoint and from a pykimi
int8 repack of it (the full-size benchmark has no disk for both the bf16 original and the repacks)."""
import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.reference  # an optional reference tool (.ci/run re-runs these)

gguf = pytest.importorskip("gguf", reason="the gguf package is an optional benchmark peer")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
TINY = os.path.join(ROOT, "tests", "golden", "tiny-kimi-vl")

from peers import gguf_export  # noqa: E402
from pykimi.quant import quantize_checkpoint  # noqa: E402


def _tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: (tuple(int(d) for d in t.shape), t.tensor_type, np.array(t.data)) for t in r.tensors}


def test_gguf_from_bf16_and_from_int8_repack_agree(tmp_path):
    q8 = str(tmp_path / "q8-all")
    quantize_checkpoint(TINY, q8, bits=8, what="all", progress=False)
    a = gguf_export.export(TINY, str(tmp_path / "a.gguf"), "q8_0", progress=False)
    b = gguf_export.export(q8, str(tmp_path / "b.gguf"), "q8_0", progress=False)
    ta, tb = _tensors(a), _tensors(b)
    assert list(ta) == list(tb)
    n_q = 0
    for name, (shape, typ, data) in ta.items():
        shape_b, typ_b, data_b = tb[name]
        assert shape == shape_b and typ == typ_b, name
        if typ == gguf.GGMLQuantizationType.Q8_0:
            # Q8_0 re-quantizes the int8 values with the same block of 32 and max/127 scale: the codes agree
            # (up to the f16 rounding of the block scale flipping a rare half-way code by one)
            n_q += 1
            qa = gguf.quants.dequantize(data, typ)
            qb = gguf.quants.dequantize(data_b, typ)
            scale = np.abs(qa).max() or 1.0
            assert np.max(np.abs(qa - qb)) <= 0.02 * scale, name
        elif typ == gguf.GGMLQuantizationType.F32:
            np.testing.assert_array_equal(data, data_b, err_msg=name)
    assert n_q > 0
