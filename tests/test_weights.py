"""The safetensors reader and writer: round trips with the official library, zero-copy views, every
malformed-file case as one CheckpointError, and a fuzz test that the parser raises nothing else."""
import json
import mmap
import os
import re
import shutil
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY
from pykimi.errors import CheckpointError
from pykimi.layout import expected_tensors
from pykimi.weights import (Checkpoint, SafetensorsFile, SafetensorsWriter, Stored, bf16_to_f32, f32_to_bf16,
                            save_file, to_bf16)

ALL = {
    "f32": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "f16": (np.arange(6, dtype=np.float16) - 2.5).reshape(2, 3),
    "i8": np.array([-128, 0, 127], dtype=np.int8),
    "u8": np.array([[0, 255]], dtype=np.uint8),
    "i16": np.array([-3, 4], dtype=np.int16),
    "i32": np.array([1 << 30, -5], dtype=np.int32),
    "i64": np.array([1 << 40], dtype=np.int64),
    "bool": np.array([True, False, True]),
    "empty": np.zeros((0, 5), dtype=np.float32),
}


def write_raw(path, header: dict, data: bytes):
    hb = json.dumps(header).encode()
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(hb)) + hb + data)


def test_roundtrip_all_dtypes_and_official_reader(tmp_path):
    from safetensors.numpy import load_file

    p = str(tmp_path / "a.safetensors")
    tensors = dict(ALL)
    tensors["bf16"] = to_bf16(np.array([1.0, -2.5, 3.14159], dtype=np.float32))
    save_file(tensors, p, metadata={"k": "v"})
    ck = Checkpoint.open(p)
    for k, v in ALL.items():
        got = ck.get(k)
        assert got.dtype == v.dtype and got.shape == v.shape, k
        np.testing.assert_array_equal(got, v)
    assert ck.info("bf16").dtype == "BF16"
    np.testing.assert_array_equal(ck.f32("bf16"), [1.0, -2.5, 3.140625])
    assert ck.metadata == {"k": "v"}
    # the official library reads what pykimi writes (bf16 needs torch there; check the rest with numpy)
    del tensors["bf16"]
    p2 = str(tmp_path / "b.safetensors")
    save_file(tensors, p2)
    off = load_file(p2)
    for k, v in ALL.items():
        np.testing.assert_array_equal(off[k], v)


def test_reads_official_writer(tmp_path):
    from safetensors.numpy import save_file as off_save

    p = str(tmp_path / "o.safetensors")
    off_save(dict(ALL), p, metadata={"format": "np"})
    ck = Checkpoint.open(p)
    for k, v in ALL.items():
        np.testing.assert_array_equal(ck.get(k), v)


@pytest.mark.reference
def test_official_reads_bf16_when_torch_present(tmp_path):
    torch = pytest.importorskip("torch", reason="torch not installed: bf16 cross-check needs safetensors.torch")
    from safetensors.torch import load_file

    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    p = str(tmp_path / "bf.safetensors")
    save_file({"w": to_bf16(x)}, p)
    t = load_file(p)["w"]
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), bf16_to_f32(f32_to_bf16(x)))
    np.testing.assert_array_equal(t.float().numpy(), torch.from_numpy(x).bfloat16().float().numpy())


def test_get_is_zero_copy_view():
    ck = Checkpoint.open(TINY)
    a = ck.get("language_model.model.embed_tokens.weight")
    assert a.dtype == np.uint16 and not a.flags.owndata and not a.flags.writeable
    b = ck.get("language_model.model.embed_tokens.weight")
    assert np.shares_memory(a, b)


def test_bf16_rounding_nearest_even():
    x = np.array([1.0, 1.00390625, 1.01171875, -0.0, np.inf, 3.0e38], dtype=np.float32)
    # 1 + 2^-8 is halfway between 1 and 1+2^-7 -> even (1.0); 1 + 3*2^-8 -> 1 + 2^-6 (even)
    np.testing.assert_array_equal(bf16_to_f32(f32_to_bf16(x))[:5], [1.0, 1.0, 1.015625, -0.0, np.inf])
    assert np.isnan(bf16_to_f32(f32_to_bf16(np.array([np.nan], np.float32))))[0]


def test_tiny_checkpoint_matches_config():
    ck = Checkpoint.open(TINY)
    exp = dict(expected_tensors(ck.config))
    assert sorted(exp) == ck.names()
    for name, shape in exp.items():
        info = ck.info(name)
        assert info.shape == shape, name
        want = "F32" if name.endswith("e_score_correction_bias") else "BF16"
        assert info.dtype == want, (name, info.dtype)
        assert os.path.basename(info.file).startswith("model-0000")


def test_f32_widening_in_tiles(monkeypatch):
    import pykimi.weights as W

    monkeypatch.setattr(W, "TILE_ELEMS", 7)  # force many tiles
    x = np.random.default_rng(1).standard_normal((13, 11)).astype(np.float32)
    s = to_bf16(x)
    np.testing.assert_array_equal(s.f32(), bf16_to_f32(s.data))


def test_streaming_writer_plan_and_abort(tmp_path):
    p = str(tmp_path / "s.safetensors")
    w = SafetensorsWriter(p)
    w.plan([("a", "F32", (2,)), ("b", "I8", (3,))])
    w.write("a", np.array([1, 2], np.float32))
    with pytest.raises(CheckpointError, match="plan expects 'b'"):
        w.write("c", np.array([1, 2, 3], np.int8))
    w.abort()
    assert not os.path.exists(p) and not os.path.exists(p + ".tmp")
    with SafetensorsWriter(p) as w:
        w.plan([("a", "F32", (2,)), ("b", "I8", (3,))])
        w.write("a", np.array([1, 2], np.float32))
        w.write("b", np.array([1, 2, 3], np.int8))
    np.testing.assert_array_equal(Checkpoint.open(p).get("b"), [1, 2, 3])


# ---------------------------------------------------------------------------------------- bad input

def _one(tmp_path):
    p = str(tmp_path / "m.safetensors")
    save_file({"x": np.arange(4, dtype=np.float32), "y": np.ones(2, np.float32)}, p)
    return p


BAD = {
    "truncated_to_4_bytes": (lambda p: open(p, "r+b").truncate(4), "truncated file"),
    "header_longer_than_file": (lambda p: _patch_len(p, 10_000), "larger than the file"),
    "header_not_json": (lambda p: _patch_header(p, b"{not json" + b" " * 200), "not valid JSON"),
    "data_truncated": (lambda p: open(p, "r+b").truncate(os.path.getsize(p) - 4), "run past the data"),
}


def _patch_len(p, n):
    with open(p, "r+b") as fh:
        fh.write(struct.pack("<Q", n))


def _patch_header(p, new):
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        rest = fh.read()
    new = new[:n].ljust(n, b" ")
    with open(p, "wb") as fh:
        fh.write(struct.pack("<Q", n) + new + rest[n:])


@pytest.mark.parametrize("case", sorted(BAD))
def test_damaged_file(tmp_path, case):
    p = _one(tmp_path)
    damage, msg = BAD[case]
    damage(p)
    with pytest.raises(CheckpointError, match=msg) as ei:
        Checkpoint.open(p)
    assert "m.safetensors" in str(ei.value) and "\n" not in str(ei.value)


@pytest.mark.parametrize("header,msg", [
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, "needs 8"),        # byte-count mismatch
    ({"x": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, "unknown dtype 'Q9'"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "overlap"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 4]}}, "data_offsets"),
    ({"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "shape"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [100, 108]}}, "run past the data"),
    ({"x": [1, 2]}, "not an object"),
    ([1, 2], "JSON list"),
])
def test_bad_headers(tmp_path, header, msg):
    p = str(tmp_path / "h.safetensors")
    write_raw(p, header, b"\0" * 16)
    with pytest.raises(CheckpointError, match=msg) as ei:
        Checkpoint.open(p)
    assert "x" in str(ei.value) or "JSON" in str(ei.value)


def test_missing_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Checkpoint.open("/nonexistent/kimi")


def test_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        Checkpoint.open(str(tmp_path), load_config=False)


def _copy_tiny(tmp_path):
    d = str(tmp_path / "ck")
    shutil.copytree(TINY, d)
    return d


def test_index_names_missing_shard(tmp_path):
    d = _copy_tiny(tmp_path)
    os.remove(os.path.join(d, "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="names shard 'model-00002-of-00002.safetensors', which is missing"):
        Checkpoint.open(d)


def test_index_names_tensor_shard_lacks(tmp_path):
    d = _copy_tiny(tmp_path)
    ip = os.path.join(d, "model.safetensors.index.json")
    idx = json.load(open(ip))
    idx["weight_map"]["language_model.model.bogus.weight"] = "model-00001-of-00002.safetensors"
    json.dump(idx, open(ip, "w"))
    with pytest.raises(CheckpointError, match="bogus.weight' in model-00001-of-00002.safetensors, but that shard"):
        Checkpoint.open(d)


def test_missing_tensor_named(tmp_path):
    ck = Checkpoint.open(TINY)
    with pytest.raises(CheckpointError, match="'language_model.model.layers.9.mlp.gate.weight' is missing"):
        ck.get("language_model.model.layers.9.mlp.gate.weight")


def test_expect_shape_and_dtype():
    ck = Checkpoint.open(TINY)
    n = "language_model.model.norm.weight"
    with pytest.raises(CheckpointError, match=r"has shape \[64\], expected \[65\]"):
        ck.expect(n, (65,))
    with pytest.raises(CheckpointError, match="has dtype BF16"):
        ck.expect(n, (64,), {"F32"})


def test_read_counter_counts_only_reads():
    ck = Checkpoint.open(TINY)
    ck.names()
    ck.info("language_model.model.norm.weight")
    assert ck.read_counter == {}
    ck.weight("language_model.model.norm.weight")
    ck.f32("language_model.model.norm.weight")
    assert ck.read_counter == {"language_model.model.norm.weight": 2}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_parser_raises_only_checkpoint_error(tmp_path, data):
    """Mutate a valid file's header bytes and random bytes: the parser raises CheckpointError or succeeds."""
    p = str(tmp_path / "f.safetensors")
    save_file({"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(3, np.int8)}, p)
    raw = bytearray(open(p, "rb").read())
    mode = data.draw(st.sampled_from(["flip", "truncate", "random", "json"]))
    if mode == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif mode == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw)))]
    elif mode == "random":
        raw = bytearray(data.draw(st.binary(min_size=0, max_size=200)))
    else:
        obj = data.draw(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c,
                                                                                         max_size=3),
                                     max_leaves=10))
        hb = json.dumps({"x": obj}).encode()
        raw = bytearray(struct.pack("<Q", len(hb)) + hb + b"\0" * 32)
    open(p, "wb").write(bytes(raw))
    try:
        ck = Checkpoint.open(p)
        for n in ck.names():
            ck.get(n)
    except CheckpointError:
        pass


def test_write_parts_streams_and_checks_bytes(tmp_path):
    p = str(tmp_path / "parts.safetensors")
    with SafetensorsWriter(p) as w:
        w.plan([("a", "F32", (2, 3))])
        w.write_parts("a", (np.arange(3, dtype=np.float32) + 3 * r for r in range(2)))
    np.testing.assert_array_equal(Checkpoint.open(p).get("a"), np.arange(6, dtype=np.float32).reshape(2, 3))
    w = SafetensorsWriter(str(tmp_path / "short.safetensors"))
    w.plan([("a", "F32", (2, 3))])
    with pytest.raises(CheckpointError, match="12 bytes written, F32\\[2, 3\\] needs 24"):
        w.write_parts("a", [np.zeros(3, np.float32)])
    w.abort()
    assert not os.path.exists(str(tmp_path / "short.safetensors")) and not os.path.exists(str(tmp_path / "short.safetensors.tmp"))


def test_writer_aligns_tensors_to_64_bytes(tmp_path):
    """The data starts on a 64-byte boundary and the tensors whose size is a multiple of 64 bytes come first,
    so each of them starts on one (a weight row's 64-byte loads stay in one cache line); the others follow. Both
    writer paths (buffered, and planned with write / write_parts), and the official reader agrees on every value."""
    import safetensors.numpy as official
    tensors = {"odd": np.arange(5, dtype=np.float32), "q4": np.arange(256, dtype=np.uint8).reshape(2, 128),
               "byte3": np.array([1, -2, 3], np.int8), "scales": np.linspace(0, 1, 48, dtype=np.float32),
               "i16": np.arange(-64, 64, dtype=np.int16).reshape(4, 32)}
    buffered = str(tmp_path / "b.safetensors")
    save_file(tensors, buffered)
    planned = str(tmp_path / "p.safetensors")
    with SafetensorsWriter(planned) as w:
        specs = [("odd", "F32", (5,)), ("q4", "U8", (2, 128)), ("byte3", "I8", (3,)), ("scales", "F32", (48,))]
        w.plan(specs)
        w.write("odd", tensors["odd"])
        w.write_parts("q4", [tensors["q4"][:1], tensors["q4"][1:]])
        w.write("byte3", tensors["byte3"])
        w.write("scales", tensors["scales"])
    for path, names in ((buffered, tensors), (planned, ("odd", "q4", "byte3", "scales"))):
        with open(path, "rb") as f:
            hlen = struct.unpack("<Q", f.read(8))[0]
        assert (8 + hlen) % 64 == 0, f"{path}: data starts at byte {8 + hlen}"
        ck, ref = Checkpoint.open(path), official.load_file(path)
        for name in names:
            got = ck.get(name)
            np.testing.assert_array_equal(got, tensors[name], err_msg=name)
            np.testing.assert_array_equal(ref[name], tensors[name], err_msg=f"official reader, {name}")
            if got.nbytes % 64 == 0:
                assert got.__array_interface__["data"][0] % 64 == 0, f"{path}: {name} ({got.nbytes} B) not aligned"


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not os.path.exists("/proc/self/smaps"),
                    reason="MADV_HUGEPAGE and /proc/self/smaps are Linux-only")
def test_weight_mappings_ask_for_huge_pages(tmp_path):
    """The read-only weight mappings carry MADV_HUGEPAGE (smaps VmFlags 'hg'), so pages faulted in from disk
    come as 2 MiB folios mapped with one TLB entry each (weights._advise_huge)."""
    src = os.path.join(TINY, "model.safetensors")
    if not os.path.exists(src):
        src = sorted(os.path.join(TINY, f) for f in os.listdir(TINY) if f.endswith(".safetensors"))[0]
    path = str(tmp_path / "one.safetensors")
    shutil.copy(src, path)
    f = SafetensorsFile(path)
    view = f.get(next(iter(f.infos)))
    flags, inside = None, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):                      # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("VmFlags:"):
                flags = line.split()[1:]
                break
    assert flags is not None, f"no mapping of {path} in /proc/self/smaps"
    assert "hg" in flags, f"VmFlags {flags}"
    del view


def test_weight_protocol_one_kind_spelling_and_rows():
    """Stored, Q8Weight and Q4Weight implement weights.Weight: kind in KINDS (one spelling each), rows() a
    view of the same kind, rows_f32 / f32 the same decoding."""
    import ast
    import inspect

    from pykimi import quant, weights
    rng = np.random.default_rng(3)
    w = rng.standard_normal((9, 70)).astype(np.float32)
    forms = {"bf16": weights.Stored("a", "BF16", weights.f32_to_bf16(w)), "f32": weights.Stored("b", "F32", w),
             "q8_32": quant.quantize_q8(w, "c"), "q4_32": quant.quantize_q4(w, "d")}
    for kind, W in forms.items():
        assert isinstance(W, weights.Weight) and W.kind == kind and kind in weights.KINDS
        assert weights.kind_of(W) == kind and W.shape == (9, 70)
        part = W.rows(2, 5)
        assert part.kind == kind and part.shape == (3, 70)
        full = W.f32()
        np.testing.assert_array_equal(part.f32(), full[2:5])
        np.testing.assert_array_equal(W.rows_f32(2, 5), full[2:5])
        np.testing.assert_array_equal(weights.f32_rows(W, 2, 5), full[2:5])
    assert weights.kind_of(w) == "f32" and weights.rows_of(w, 1, 2).base is w
    with pytest.raises(CheckpointError, match="not a float weight"):
        weights.Stored("ids", "I64", np.zeros(3, np.int64)).kind
    # no import circle: weights.py never imports quant.py (quant builds on weights)
    tree = ast.parse(inspect.getsource(weights))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | \
               {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and "quant" in m for m in imported), imported
