"""Property-based fuzz (hypothesis) of what pykimi reads from disk: safetensors headers and data layout,
config.json values, image files (issue 19 #8).

The invariant, per generated case: pykimi raises one of its own errors (PykimiError, one line) naming the file
(or the field / tensor that is wrong), or the result is identical to the uncorrupted input's -- never another
exception, a hang, a non-finite output, or a changed input file (sha256 before and after).

Where the format cannot tell a damaged file from a different valid one, the weaker "error or finite result"
is checked and said so: a header relabelling a BF16 tensor as F16 (same width, both accepted), a config
value changed to another valid one, a lossy image format's (JPEG, ...) damaged but decodable bytes.

Budget: about a minute in all (examples fixed by ``derandomize``; PYKIMI_FUZZ_SCALE=k runs k times as many).
The number of cases run is printed at the end (``-s``) and recorded in README.md (Reliability).
"""
import copy
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings, strategies as st  # noqa: E402

import pykimi  # noqa: E402
from conftest import GOLDEN, TINY  # noqa: E402
from pykimi.errors import PykimiError  # noqa: E402

SCALE = max(1, int(os.environ.get("PYKIMI_FUZZ_SCALE", "1")))
COUNTS: dict = {}


def _settings(n):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def _count(kind, outcome):
    COUNTS.setdefault(kind, {}).setdefault(outcome, 0)
    COUNTS[kind][outcome] += 1


def teardown_module(module):
    total = sum(sum(v.values()) for v in COUNTS.values())
    print(f"\nfuzz cases: {total} " + json.dumps(COUNTS, sort_keys=True))


def sha(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def one_line(e):
    assert "\n" not in str(e), str(e)
    return str(e)


# ------------------------------------------------------------------------------------------ the model run

@pytest.fixture(scope="module")
def work():
    """A scratch copy of the tiny checkpoint, the baseline logits of a prompt with one small image."""
    d = tempfile.mkdtemp(prefix="pykimi-fuzz-")
    ck = os.path.join(d, "ck")
    shutil.copytree(TINY, ck)
    originals = {f: open(os.path.join(ck, f), "rb").read() for f in os.listdir(ck)}
    inputs = _inputs(pykimi.load(ck))
    base = _run(ck, inputs)
    yield {"dir": ck, "orig": originals, "inputs": inputs, "base": base}
    shutil.rmtree(d, ignore_errors=True)


def _inputs(model):
    from PIL import Image

    from pykimi.image import preprocess_images

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 56, 3), dtype=np.uint8))
    pv, g = preprocess_images([img])
    n = int(g[0, 0] * g[0, 1]) // 4
    ids = np.array([1, 2] + [model.config.media_placeholder_token_id] * n + [3, 4], dtype=np.int64)
    return ids, pv, g


def _run(ck, inputs):
    ids, pv, g = inputs
    model = pykimi.load(ck)
    return model.forward(ids, pixel_values=pv, image_grid_hws=g)


def _restore(work):
    for f, b in work["orig"].items():
        p = os.path.join(work["dir"], f)
        if open(p, "rb").read() != b:
            with open(p, "wb") as fh:
                fh.write(b)


def _check_run(work, kind, named, weak=False, file=None):
    """Run the model on the (mutated) checkpoint and check the invariant. ``named``: strings of which one must
    be in the error message. ``weak``: a finite result is enough (the mutation may be a valid change)."""
    hashes = {f: sha(os.path.join(work["dir"], f)) for f in work["orig"]}
    try:
        logits = _run(work["dir"], work["inputs"])
    except PykimiError as e:
        msg = one_line(e)
        assert any(n in msg for n in named), (named, msg)
        _count(kind, "error")
    else:
        assert np.isfinite(logits).all(), "non-finite output"
        if weak:
            _count(kind, "same" if np.array_equal(logits, work["base"]) else "valid-change")
        else:
            assert np.array_equal(logits, work["base"]), f"{kind}: a different result without an error"
            _count(kind, "same")
    assert {f: sha(os.path.join(work["dir"], f)) for f in work["orig"]} == hashes, "an input file changed"


# ------------------------------------------------------------------------------ safetensors header / layout

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL", "Q9", 3, None]


def _split(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n], raw[8 + n:]


def _join(header: dict, data: bytes) -> bytes:
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * ((8 - len(hb) % 8) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


json_edit = st.one_of(
    st.tuples(st.just("offset"), st.integers(0, 10 ** 6), st.sampled_from([0, 1]),
              st.integers(-4096, 4096).filter(bool)),
    st.tuples(st.just("shape"), st.integers(0, 10 ** 6), st.integers(0, 3), st.integers(-3, 3).filter(bool)),
    st.tuples(st.just("shape_len"), st.integers(0, 10 ** 6), st.sampled_from(["append1", "append2", "drop", "[]"]),
              st.just(0)),
    st.tuples(st.just("dtype"), st.integers(0, 10 ** 6), st.sampled_from(DTYPES), st.just(0)),
    st.tuples(st.just("drop"), st.integers(0, 10 ** 6), st.just(0), st.just(0)),
    st.tuples(st.just("junk"), st.integers(0, 10 ** 6), st.sampled_from(["offsets_str", "offsets_3", "entry_list",
                                                                         "meta_int", "meta_list", "neg"]),
              st.just(0)),
    st.tuples(st.just("reorder"), st.integers(0, 10 ** 6), st.just(0), st.just(0)),   # must be harmless
    st.tuples(st.just("metadata"), st.integers(0, 10 ** 6), st.text(max_size=8), st.just(0)),  # harmless
)

byte_edit = st.one_of(
    st.tuples(st.just("hlen"), st.integers(-64, 64).filter(bool)),
    st.tuples(st.just("hlen_abs"), st.integers(0, 2 ** 64 - 1)),
    st.tuples(st.just("flip"), st.integers(0, 10 ** 9), st.integers(1, 255)),            # in the header
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 9)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 9), st.binary(min_size=1, max_size=8)),  # into the header
)


def _apply_json(raw, edit):
    kind, k, a, b = edit
    n, hb, data = _split(raw)
    header = json.loads(hb)
    names = [x for x in header if x != "__metadata__"]
    name = names[k % len(names)]
    ent = header[name]
    weak = False
    if kind == "offset":
        ent["data_offsets"][a] += b
    elif kind == "shape":
        if ent["shape"]:
            i = a % len(ent["shape"])
            ent["shape"][i] = ent["shape"][i] + b
        else:
            ent["shape"] = [b]
    elif kind == "shape_len":
        ent["shape"] = (ent["shape"] + [1] if a == "append1" else ent["shape"] + [2] if a == "append2"
                        else ent["shape"][:-1] if a == "drop" else [])
    elif kind == "dtype":
        # BF16 <-> F16 keeps the byte count and both are float dtypes the model accepts: a valid (different)
        # file, which no reader can tell from the original without a checksum -> the weak invariant
        weak = {ent["dtype"], a} == {"BF16", "F16"}
        ent["dtype"] = a
    elif kind == "drop":
        del header[name]
    elif kind == "junk":
        if a == "offsets_str":
            ent["data_offsets"] = [str(o) for o in ent["data_offsets"]]
        elif a == "offsets_3":
            ent["data_offsets"] = ent["data_offsets"] + [0]
        elif a == "entry_list":
            header[name] = list(ent.values())
        elif a == "meta_int":
            header["__metadata__"] = 5
        elif a == "meta_list":
            header["__metadata__"] = ["x"]
        elif a == "neg":
            ent["data_offsets"] = [-8, ent["data_offsets"][1]]
    elif kind == "reorder":
        items = list(header.items())
        r = np.random.default_rng(k)
        r.shuffle(items)
        header = dict(items)
    elif kind == "metadata":
        meta = dict(header.get("__metadata__") or {})
        meta[f"fuzz{k % 7}"] = a
        header["__metadata__"] = meta
    return _join(header, data), weak, kind in ("reorder", "metadata")


def _apply_bytes(raw, edit):
    kind = edit[0]
    n, hb, data = _split(raw)
    if kind == "hlen":
        return struct.pack("<Q", max(0, n + edit[1])) + raw[8:]
    if kind == "hlen_abs":
        return struct.pack("<Q", edit[1]) + raw[8:]
    if kind == "flip":
        i = edit[1] % (8 + n)
        b = bytearray(raw)
        b[i] ^= edit[2]
        return bytes(b)
    if kind == "truncate":
        return raw[: edit[1] % len(raw)]
    if kind == "append":
        return raw + edit[1]
    if kind == "insert":
        i = 8 + edit[1] % n
        return raw[:i] + edit[2] + raw[i:]
    raise AssertionError(kind)


def _repad(raw: bytes, extra: int) -> bytes:
    """The same file with ``extra`` more spaces of header padding (JSON whitespace: means the same)."""
    n, hb, data = _split(raw)
    return struct.pack("<Q", n + extra) + hb + b" " * extra + data


# the probe's original cases, always run: a header length one byte short (issue 19 #1) or long, across padding
@example(edit=("hlen", -1), shard=SHARDS[0], pad=0)
@example(edit=("hlen", -1), shard=SHARDS[1], pad=9)
@example(edit=("hlen", 1), shard=SHARDS[1], pad=0)
@example(edit=("append", b"\0"), shard=SHARDS[0], pad=3)
@example(edit=("reorder", 5, 0, 0), shard=SHARDS[0], pad=0)
@given(edit=st.one_of(json_edit, byte_edit), shard=st.sampled_from(SHARDS), pad=st.integers(0, 16))
@_settings(250)
def test_fuzz_safetensors_header_and_layout(work, edit, shard, pad):
    _restore(work)
    p = os.path.join(work["dir"], shard)
    raw = work["orig"][shard]
    if edit[0] in ("offset", "shape", "shape_len", "dtype", "drop", "junk", "reorder", "metadata"):
        new, weak, _ = _apply_json(raw, edit)
    else:
        new, weak = _apply_bytes(_repad(raw, pad), edit), False
    with open(p, "wb") as fh:
        fh.write(new)
    # the error names the shard, or (a tensor gone / renamed) the checkpoint directory and config.json's need
    _check_run(work, "safetensors", [shard, work["dir"]], weak=weak)
    _restore(work)


entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "BF16", "U8", "I64", "BOOL", "F16", "X"]),
    "shape": st.lists(st.integers(0, 4), max_size=3),
    "data_offsets": st.lists(st.integers(0, 48), min_size=2, max_size=2),
})
def _valid_then_nudged(t):
    """A well-formed file from (tensors, nudge): tensors laid end to end, then one small nudge (or none)."""
    tensors, (where, delta) = t
    from pykimi.weights import DTYPES as ST_DTYPES

    header, off = {}, 0
    for name, dt, shape in tensors:
        nb = int(np.prod(shape)) * ST_DTYPES[dt].itemsize
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + nb]}
        off += nb
    extra = 0
    if header and where == "offset":
        k = sorted(header)[delta % len(header)]
        header[k]["data_offsets"][delta % 2] += delta or 1
    elif where == "data":
        extra = delta
    hb = json.dumps(header).encode()
    n = max(0, len(hb) + (delta if where == "hlen" else 0))
    return struct.pack("<Q", n) + hb + bytes(max(0, off + extra))


valid_file = st.tuples(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", "d", "e"]), st.sampled_from(["F32", "BF16", "U8", "I64"]),
                       st.lists(st.integers(0, 4), max_size=3)), max_size=4, unique_by=lambda x: x[0]),
    st.tuples(st.sampled_from(["none", "none", "offset", "data", "hlen"]), st.integers(-3, 3))).map(_valid_then_nudged)

raw_file = st.one_of(
    valid_file,
    st.binary(max_size=256),
    st.tuples(st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), entry, max_size=4),
              st.integers(0, 64), st.integers(0, 7)).map(
        lambda t: (lambda hb: struct.pack("<Q", len(hb) + t[2]) + hb + b" " * t[2] + bytes(t[1]))(
            json.dumps(t[0]).encode())),
)


@given(data=raw_file)
@_settings(400)
def test_fuzz_safetensors_reader_never_crashes(tmp_path_factory, data):
    """Arbitrary bytes, or random headers over random data lengths, as a .safetensors file: a CheckpointError
    naming it, or a file whose tensors tile its data region exactly (sorted, from 0, no gap or overlap, to the
    end) and each read back with the size its dtype and shape need -- no other exception, no hang, the file
    unchanged."""
    from pykimi.weights import DTYPES as ST_DTYPES, Checkpoint

    d = tmp_path_factory.mktemp("raw", numbered=True)
    p = str(d / "f.safetensors")
    with open(p, "wb") as fh:
        fh.write(data)
    h = sha(p)
    try:
        ck = Checkpoint.open(p)
        f = next(iter(ck._files.values()))
        spans = sorted((ck.info(n).offset - f.data_start, ck.info(n).nbytes) for n in ck.names())
        pos = 0
        for off, nb in spans:
            assert off == pos, "an accepted file whose tensors do not tile the data"
            pos += nb
        assert pos == len(data) - f.data_start
        for n in ck.names():
            i = ck.info(n)
            assert ck.get(n).nbytes == i.nbytes == int(np.prod(i.shape)) * ST_DTYPES[i.dtype].itemsize
        _count("safetensors-bytes", "read")
    except PykimiError as e:
        assert "f.safetensors" in one_line(e), str(e)
        _count("safetensors-bytes", "error")
    assert sha(p) == h


# ------------------------------------------------------------------------------------------- config.json

# keys the forward pass never reads (or reads only as limits the prompt stays within): a changed valid value
# must leave the logits identical
UNUSED = {"initializer_range", "use_cache", "aux_loss_alpha", "seq_aux", "ep_size", "pretraining_tp",
          "attention_dropout", "num_key_value_heads", "torch_dtype", "bos_token_id", "eos_token_id",
          "pad_token_id", "max_position_embeddings", "architectures", "auto_map", "ignore_index",
          "transformers_version"}

values = st.one_of(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0, -1, 1, 2, True, False, None, "", "7", [], {},
                     [2, 2], 10 ** 12, 2 ** 63, -(2 ** 63), 1e300, 1e-300, 0.5]),
    st.integers(-10 ** 6, 10 ** 6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
)


def _config_keys():
    cfg = json.load(open(os.path.join(TINY, "config.json")))
    keys = [(None, k) for k in cfg if k not in ("text_config", "vision_config")]
    keys += [("text_config", k) for k in cfg["text_config"]] + [("vision_config", k) for k in cfg["vision_config"]]
    return keys


@given(key=st.sampled_from(_config_keys()), value=values, delete=st.sampled_from([False, False, False, True]))
@_settings(250)
def test_fuzz_config_values(work, key, value, delete):
    _restore(work)
    p = os.path.join(work["dir"], "config.json")
    cfg = json.loads(work["orig"]["config.json"])
    sect, k = key
    target = cfg if sect is None else cfg[sect]
    old = copy.deepcopy(target[k])
    if delete:
        del target[k]
    else:
        target[k] = value
    with open(p, "w") as fh:
        json.dump(cfg, fh)                     # NaN / Infinity written as Python's json reads them
    unchanged = k in target and (target[k] == old and type(target[k]) is type(old))
    # an error names config.json or the field; a run must be finite, and identical when nothing used changed
    # (the placeholder id is checked against the prompt's ids, which were made with the intact config)
    named = ["config.json", k] + (["placeholder"] if k == "media_placeholder_token_id" else [])
    _check_run(work, "config", named, weak=not (unchanged or k in UNUSED))
    _restore(work)


# ------------------------------------------------------------------------------------------------- images

MODES = ["RGB", "L", "RGBA", "P", "LA", "1", "I;16", "CMYK"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "WEBP": ".webp"}


def _image(mode, w, h, seed):
    from PIL import Image

    r = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(r.integers(0, 65536, (h, w), dtype=np.uint16))
    return Image.fromarray(r.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def _encode(img, fmt):
    if fmt in ("JPEG",) and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    if fmt in ("GIF", "BMP", "WEBP") and img.mode in ("I;16", "CMYK", "LA"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except OSError:                  # a mode this format cannot store (CMYK as PNG, ...): its RGB form
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format=fmt)
    return buf.getvalue()


image_edit = st.one_of(
    st.tuples(st.just("none"), st.just(0), st.just(b"")),
    st.tuples(st.just("flip"), st.integers(0, 10 ** 9), st.binary(min_size=1, max_size=1).filter(lambda b: b != b"\0")),
    st.tuples(st.just("truncate"), st.integers(0, 10 ** 9), st.just(b"")),
    st.tuples(st.just("insert"), st.integers(0, 10 ** 9), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("header"), st.integers(0, 63), st.binary(min_size=1, max_size=1)),  # near the size fields
)


@pytest.mark.filterwarnings("ignore::UserWarning")     # Pillow's notes on the damaged TIFFs it still reads
@given(mode=st.sampled_from(MODES), fmt=st.sampled_from(sorted(FORMATS)), w=st.integers(1, 80),
       h=st.integers(1, 80), seed=st.integers(0, 2 ** 16), edit=image_edit)
@_settings(400)
def test_fuzz_image_files(tmp_path_factory, mode, fmt, w, h, seed, edit):
    """An image file, intact or damaged: an InputError naming the file, or pixel values that are finite, of
    the grid's shape, and -- for the intact file and for PNG, whose chunks carry CRCs and whose pixels a zlib
    checksum -- identical to the intact file's."""
    from pykimi.image import preprocess_image

    good = _encode(_image(mode, w, h, seed), fmt)
    kind, pos, blob = edit
    if kind == "none":
        bad = good
    elif kind == "flip":
        i = pos % len(good)
        bad = good[:i] + bytes([good[i] ^ blob[0]]) + good[i + 1:]
    elif kind == "truncate":
        bad = good[: pos % len(good)]
    elif kind == "insert":
        i = pos % len(good)
        bad = good[:i] + blob + good[i:]
    elif kind == "append":
        bad = good + blob
    else:
        i = pos % len(good)
        bad = good[:i] + bytes([good[i] ^ (blob[0] or 1)]) + good[i + 1:]
    d = tmp_path_factory.mktemp("img", numbered=True)
    p_good, p_bad = str(d / ("good" + FORMATS[fmt])), str(d / ("bad" + FORMATS[fmt]))
    open(p_good, "wb").write(good)
    open(p_bad, "wb").write(bad)
    h_bad = sha(p_bad)
    ref, gref = preprocess_image(p_good)
    try:
        pv, g = preprocess_image(p_bad)
    except PykimiError as e:
        assert "bad" + FORMATS[fmt] in one_line(e), str(e)
        _count("image", "error")
    else:
        assert np.isfinite(pv).all() and pv.shape == (g[0] * g[1], 3, 14, 14)
        same = g == gref and np.array_equal(pv, ref)
        if bad == good or fmt == "PNG":
            assert same, f"{fmt} {kind}: a damaged file decoded to a different image without an error"
        _count("image", "same" if same else "decoded-differently(lossy format)")
    assert sha(p_bad) == h_bad
