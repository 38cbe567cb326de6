"""int8 / int4 weight formats and the streaming checkpoint repack.

Formats (blocks of 32 along `in`, one float32 scale per block; the kernels in csrc/ read them directly):

  Q8_32  q int8 [out, in], scales f32 [out, ceil(in/32)]
         W[o, i] = q[o, i] * scales[o, i // 32];  scale = max|w| / 127 over the block, q = round(w / scale).
  Q4_32  q uint8 [out, ceil(in/2)]: element 2j in the low nibble, 2j+1 in the high nibble, code = value + 8;
         W[o, i] = (code - 8) * scales[o, i // 32];  scale = m / -8 where m is the block's element of largest
         magnitude (so m itself maps exactly to -8 and the full -8..7 range is used; the scale may be negative).

A short last block (in not a multiple of 32) is quantized as if zero-padded. In a repacked checkpoint a
quantized tensor NAME is stored as two ordinary tensors, NAME.qweight (I8 or U8) and NAME.scales (F32), and
every shard's metadata carries ``"pykimi.quant": json {NAME: {"format": "q8_32"|"q4_32", "shape": [out, in]}}``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .kernels.ref import QBLOCK, dequant_q4, dequant_q8

META_KEY = "pykimi.quant"
FORMATS = {8: "q8_32", 4: "q4_32"}
_TILE_ELEMS = 1 << 22  # quantize at most 4M weights (16 MB of f32) at a time


# ------------------------------------------------------------------------------------------ weights

@dataclass(frozen=True)
class Q8Weight:
    """A linear weight W [out, in] in Q8_32 form (see module docstring)."""

    name: str
    shape: tuple
    q: np.ndarray       # int8 [out, in]
    scales: np.ndarray  # f32 [out, ceil(in/32)]
    fmt: ClassVar[str] = "q8_32"
    dtype: ClassVar[str] = "Q8_32"

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scales.nbytes)

    def rows_f32(self, r0: int, r1: int) -> np.ndarray:
        return dequant_q8(self.q[r0:r1], self.scales[r0:r1], self.shape[1])

    def f32(self) -> np.ndarray:
        """Dequantized float32 [out, in] (the NumPy twin of the kernels' decoding)."""
        return self.rows_f32(0, self.shape[0])


@dataclass(frozen=True)
class Q4Weight:
    """A linear weight W [out, in] in Q4_32 form (see module docstring)."""

    name: str
    shape: tuple
    q: np.ndarray       # uint8 [out, ceil(in/2)]
    scales: np.ndarray  # f32 [out, ceil(in/32)]
    fmt: ClassVar[str] = "q4_32"
    dtype: ClassVar[str] = "Q4_32"

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scales.nbytes)

    def rows_f32(self, r0: int, r1: int) -> np.ndarray:
        return dequant_q4(self.q[r0:r1], self.scales[r0:r1], self.shape[1])

    def f32(self) -> np.ndarray:
        return self.rows_f32(0, self.shape[0])


# ------------------------------------------------------------------------------------- quantization

def _blocks(w: np.ndarray) -> np.ndarray:
    """[out, in] f32 -> [out, nb, 32] zero-padded blocks."""
    out_f, in_f = w.shape
    nb = -(-in_f // QBLOCK)
    if in_f == nb * QBLOCK:
        return w.reshape(out_f, nb, QBLOCK)
    pad = np.zeros((out_f, nb * QBLOCK), dtype=np.float32)
    pad[:, :in_f] = w
    return pad.reshape(out_f, nb, QBLOCK)


def _q8_tile(w: np.ndarray):
    b = _blocks(w)
    scale = np.max(np.abs(b), axis=-1) / np.float32(127)                  # [out, nb]
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale > 0)
    q = np.clip(np.rint(b * inv[..., None]), -127, 127).astype(np.int8)
    return q.reshape(w.shape[0], -1)[:, :w.shape[1]], scale.astype(np.float32)


def _q4_tile(w: np.ndarray):
    b = _blocks(w)
    idx = np.argmax(np.abs(b), axis=-1)[..., None]
    m = np.take_along_axis(b, idx, axis=-1)[..., 0]                       # signed max-magnitude element
    scale = (m / np.float32(-8)).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    v = np.clip(np.rint(b * inv[..., None]), -8, 7).astype(np.int8)      # -8..7
    codes = (v.reshape(w.shape[0], -1)[:, :w.shape[1]] + 8).astype(np.uint8)
    if codes.shape[1] % 2:
        codes = np.concatenate([codes, np.full((codes.shape[0], 1), 8, np.uint8)], axis=1)  # pad code = 0.0
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale


def _quantize(w, bits: int, name: str):
    """Quantize W [out, in] (ndarray or anything with .shape and rows via weight_rows_f32) in row tiles."""
    from .kernels.ref import weight_rows_f32
    out_f, in_f = (int(s) for s in w.shape)
    nb = -(-in_f // QBLOCK)
    q = np.empty((out_f, in_f if bits == 8 else -(-in_f // 2)), dtype=np.int8 if bits == 8 else np.uint8)
    scales = np.empty((out_f, nb), dtype=np.float32)
    step = max(1, _TILE_ELEMS // max(in_f, 1))
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        tile = np.asarray(weight_rows_f32(w, r0, r1), dtype=np.float32)
        q[r0:r1], scales[r0:r1] = (_q8_tile if bits == 8 else _q4_tile)(tile)
    cls = Q8Weight if bits == 8 else Q4Weight
    return cls(name, (out_f, in_f), q, scales)


def quantize_q8(w, name: str = "") -> Q8Weight:
    """float32 [out, in] (or a Stored) -> Q8Weight."""
    return _quantize(w, 8, name or getattr(w, "name", ""))


def quantize_q4(w, name: str = "") -> Q4Weight:
    """float32 [out, in] (or a Stored) -> Q4Weight."""
    return _quantize(w, 4, name or getattr(w, "name", ""))


# ------------------------------------------------------------------------------- which tensors

_EXPERT_RE = re.compile(r"^language_model\.model\.layers\.\d+\.mlp\.(experts\.\d+|shared_experts)\."
                        r"(gate|up|down)_proj\.weight$")


def should_quantize(name: str, shape, what: str = "experts") -> bool:
    """'experts': routed + shared expert projections. 'all': every 2-D linear weight of the language model
    except embed_tokens (lm_head included). Never norms, biases, the router gate, e_score_correction_bias,
    rotary tables, the vision tower or the projector."""
    if len(shape) != 2:
        return False
    if what == "experts":
        return bool(_EXPERT_RE.match(name))
    if what != "all":
        raise ValueError(f"quantize: what must be 'experts' or 'all', got {what!r}")
    if not name.startswith("language_model.") or not name.endswith(".weight"):
        return False
    if "embed_tokens" in name or name.endswith(".mlp.gate.weight") or "norm" in name.rsplit(".", 2)[-2]:
        return False
    return True


# ----------------------------------------------------------------------------------- load side

def _quant_meta(ckpt) -> dict:
    cached = getattr(ckpt, "_pykimi_quant_meta", None)
    if cached is not None:
        return cached
    raw = (getattr(ckpt, "metadata", None) or {}).get(META_KEY)
    meta = {}
    if raw:
        try:
            meta = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (ValueError, TypeError):
            meta = {}
    try:
        ckpt._pykimi_quant_meta = meta
    except AttributeError:
        pass
    return meta


def is_quantized(ckpt, name: str) -> bool:
    """True when the checkpoint stores `name` quantized (header lookup only: no data view, no read count)."""
    return (name + ".qweight") in ckpt and (name + ".scales") in ckpt


def load_quantized(ckpt, name: str):
    """The quantized weight stored for `name` (NAME.qweight + NAME.scales), or None if there is none."""
    from .errors import CheckpointError
    qname, sname = name + ".qweight", name + ".scales"
    if qname not in ckpt:
        return None
    entry = _quant_meta(ckpt).get(name) or {}
    qinfo = ckpt.info(qname)
    fmt = entry.get("format") or {"I8": "q8_32", "U8": "q4_32"}.get(qinfo.dtype)
    if fmt not in ("q8_32", "q4_32"):
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: tensor {qname!r} has dtype {qinfo.dtype}, "
                              f"expected I8 (q8_32) or U8 (q4_32)")
    if sname not in ckpt:
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: quantized tensor {qname!r} has no {sname!r}")
    q, scales = ckpt.get(qname), ckpt.get(sname)
    rows = q.shape[0] if q.ndim == 2 else -1
    if "shape" in entry:
        shape = tuple(int(s) for s in entry["shape"])
    else:
        shape = (rows, q.shape[1] if fmt == "q8_32" else 2 * q.shape[1])
    want_q = (shape[0], shape[1] if fmt == "q8_32" else -(-shape[1] // 2))
    want_s = (shape[0], -(-shape[1] // QBLOCK))
    want_dt = "I8" if fmt == "q8_32" else "U8"
    if tuple(q.shape) != want_q or qinfo.dtype != want_dt:
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: tensor {qname!r} is {qinfo.dtype}{list(q.shape)}, "
                              f"expected {want_dt}{list(want_q)} for {fmt} weight of shape {list(shape)}")
    if tuple(scales.shape) != want_s or scales.dtype != np.float32:
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: tensor {sname!r} is {scales.dtype}"
                              f"{list(scales.shape)}, expected float32{list(want_s)}")
    cls = Q8Weight if fmt == "q8_32" else Q4Weight
    return cls(name, shape, q, scales)


# ------------------------------------------------------------------------------------ the repack

def _planned_pair(name: str, shape, bits: int) -> list:
    """The writer plan of a quantized weight NAME [out, in]: NAME.qweight and NAME.scales."""
    o, k = (int(s) for s in shape)
    return [(name + ".qweight", "I8" if bits == 8 else "U8", (o, k if bits == 8 else -(-k // 2))),
            (name + ".scales", "F32", (o, -(-k // QBLOCK)))]


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr)
    except ImportError:  # tqdm is a dependency, but never fail a repack over a progress bar
        return None


def quantize_checkpoint(src_dir, dst_dir, bits: int = 8, what: str = "experts", progress: bool = True,
                        overwrite: bool = False) -> dict:
    """Stream a checkpoint tensor by tensor into a new one with selected weights quantized.

    Keeps the source's shard layout (same file names, same index), reads one tensor at a time and quantizes
    it in bounded row tiles; the new checkpoint is built in ``DST.partial`` and renamed to ``DST`` only when
    complete (each shard is itself written to a .tmp name first). Non-weight files (config.json, tokenizer
    files, ...) are copied. The source may itself be a repack: its selected weights in another format are
    re-quantized from their dequantized values, the rest keep their stored codes and scales. Returns a summary
    dict (tensors quantized, bytes in / out).
    """
    from .errors import CheckpointError
    from .weights import Checkpoint, SafetensorsWriter

    if bits not in FORMATS:
        raise ValueError(f"quantize: bits must be 8 or 4, got {bits!r}")
    if what not in ("experts", "all"):
        raise ValueError(f"quantize: what must be 'experts' or 'all', got {what!r}")
    fmt = FORMATS[bits]
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir).rstrip("/")
    if os.path.abspath(src_dir) == os.path.abspath(dst_dir):
        raise CheckpointError(f"{dst_dir}: destination must differ from the source checkpoint")
    if os.path.exists(dst_dir) and not overwrite:
        raise CheckpointError(f"{dst_dir}: already exists (pass overwrite=True / --overwrite to replace it)")
    ckpt = Checkpoint.open(src_dir, load_config=False)
    if not os.path.isdir(src_dir):
        src_dir = os.path.dirname(os.path.abspath(src_dir))

    names = ckpt.names()
    infos = {n: ckpt.info(n) for n in names}
    # a source that is itself repacked: NAME.qweight + NAME.scales form one logical weight NAME, which is
    # re-quantized when selected and in another format, else copied as stored (its codes and scales unchanged)
    src_q = {n[:-len(".qweight")]: load_quantized(ckpt, n[:-len(".qweight")]) for n in names
             if n.endswith(".qweight") and n[:-len(".qweight")] + ".scales" in infos}
    chosen = {n for n in names if infos[n].dtype in ("BF16", "F16", "F32")
              and should_quantize(n, infos[n].shape, what)}
    requant = {b for b, qw in src_q.items() if qw.fmt != fmt and should_quantize(b, qw.shape, what)}
    qmeta = {n: {"format": fmt, "shape": [int(s) for s in infos[n].shape]} for n in chosen}
    qmeta.update({b: {"format": fmt if b in requant else qw.fmt, "shape": [int(s) for s in qw.shape]}
                  for b, qw in src_q.items()})
    qmeta = dict(sorted(qmeta.items()))
    meta = {"format": "pt", META_KEY: json.dumps(qmeta, separators=(",", ":"), sort_keys=True),
            "pykimi.quant.bits": str(bits), "pykimi.quant.what": what}

    # group by source shard, keep header order within a shard (sequential reads of the mmap)
    by_file: dict[str, list[str]] = {}
    for n in names:
        by_file.setdefault(infos[n].file, []).append(n)
    for f in by_file:
        by_file[f].sort(key=lambda n: infos[n].offset)

    part = dst_dir + ".partial"
    if os.path.exists(part):
        shutil.rmtree(part)
    os.makedirs(part)
    total = sum(i.nbytes for i in infos.values())
    bar = _progress(total, progress, f"quantize q{bits} {what}")
    weight_map: dict[str, str] = {}
    out_bytes = 0
    try:
        for src_file, tensor_names in by_file.items():
            base_file = os.path.basename(src_file)
            plan = []
            for n in tensor_names:
                i = infos[n]
                base = n[:-len(".qweight")] if n.endswith(".qweight") else None
                if base in requant:
                    plan += _planned_pair(base, src_q[base].shape, bits)
                elif n.endswith(".scales") and n[:-len(".scales")] in requant:
                    continue                                            # planned beside its .qweight
                elif n in chosen:
                    plan += _planned_pair(n, i.shape, bits)
                else:
                    plan.append((n, i.dtype, tuple(i.shape)))
            writer = SafetensorsWriter(os.path.join(part, base_file), metadata=meta)
            try:
                writer.plan(plan)
                for n in tensor_names:
                    base = n[:-len(".qweight")] if n.endswith(".qweight") else None
                    if base in requant or n in chosen:
                        name = base if base in requant else n
                        qw = _quantize(src_q[name] if base in requant else ckpt.tensor(n), bits, name)
                        writer.write(name + ".qweight", qw.q)
                        writer.write(name + ".scales", qw.scales)
                        weight_map[name + ".qweight"] = weight_map[name + ".scales"] = base_file
                        out_bytes += qw.nbytes
                        del qw
                    elif n.endswith(".scales") and n[:-len(".scales")] in requant:
                        pass                                            # written beside its .qweight
                    else:
                        st = ckpt.tensor(n)
                        writer.write(n, st)
                        weight_map[n] = base_file
                        out_bytes += st.nbytes
                    if bar is not None:
                        bar.update(infos[n].nbytes)
                writer.close()
            except BaseException:
                writer.abort()
                raise
        # the index (always written when the source had one; harmless otherwise)
        src_index = os.path.join(src_dir, "model.safetensors.index.json")
        if os.path.exists(src_index) or len(by_file) > 1:
            index = {"metadata": {"total_size": out_bytes, META_KEY: qmeta,
                                  "pykimi.quant.bits": bits, "pykimi.quant.what": what},
                     "weight_map": dict(sorted(weight_map.items()))}
            with open(os.path.join(part, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)
        # everything else (config.json, tokenizer files, chat template, ...)
        for fn in sorted(os.listdir(src_dir)):
            p = os.path.join(src_dir, fn)
            if (os.path.isfile(p) and not fn.endswith(".safetensors") and fn != "model.safetensors.index.json"
                    and not fn.endswith((".tmp", ".partial"))):
                shutil.copy2(p, os.path.join(part, fn))
    except BaseException:
        if bar is not None:
            bar.close()
        shutil.rmtree(part, ignore_errors=True)
        raise
    if bar is not None:
        bar.close()
    ckpt.close()
    if os.path.exists(dst_dir):  # overwrite=True: swap, then drop the old one
        old = dst_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst_dir, old)
        os.replace(part, dst_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(part, dst_dir)
    return {"quantized": len(chosen) + len(requant), "tensors": len(names), "bytes_in": total,
            "bytes_out": out_bytes, "format": fmt, "what": what, "path": dst_dir}
