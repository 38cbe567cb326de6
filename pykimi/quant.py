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

import numpy as np

# the formats themselves (Q8Weight, Q4Weight, their decoding and loading) live in weights.py with the Weight
# protocol; this module makes them (quantize_*) and repacks checkpoints
from .errors import CheckpointError
from .weights import (META_KEY, QBLOCK, TILE_ELEMS, Checkpoint, Q4Weight, Q8Weight,  # noqa: F401
                      SafetensorsWriter, f32_rows, is_quantized, load_quantized)

FORMATS = {8: "q8_32", 4: "q4_32"}


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
    """Quantize W [out, in] (an ndarray or a Weight) in row tiles of at most TILE_ELEMS weights."""
    out_f, in_f = (int(s) for s in w.shape)
    nb = -(-in_f // QBLOCK)
    q = np.empty((out_f, in_f if bits == 8 else -(-in_f // 2)), dtype=np.int8 if bits == 8 else np.uint8)
    scales = np.empty((out_f, nb), dtype=np.float32)
    step = max(1, TILE_ELEMS // max(in_f, 1))
    for r0 in range(0, out_f, step):
        r1 = min(out_f, r0 + step)
        tile = np.asarray(f32_rows(w, r0, r1), dtype=np.float32)
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


_PARTIAL_MARKER = ".pykimi-partial"   # written first into DST.partial: only a directory holding it is ours to delete


def _inside(a: str, b: str) -> bool:
    """Real path a equals b or lies under it."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _check_destination(src: str, dst: str, overwrite: bool) -> str:
    """Refuse a destination that would destroy data, before anything is read or written; returns DST.partial.

    Symlinks are resolved. Refused: an empty name; DST equal to, inside or containing the source (the repack
    replaces DST, so `quantize X/ck X --overwrite` once deleted the source); DST.partial being or
    containing the source; an existing DST without --overwrite; with --overwrite, an existing directory that
    holds no checkpoint (config.json or *.safetensors), so a mistyped `.` or `~` is never replaced; a DST.partial
    that pykimi did not create (no marker file)."""
    from .errors import CheckpointError

    if not dst:
        raise CheckpointError("quantize: the destination is an empty path")
    if not os.path.exists(src):
        raise CheckpointError(f"{src}: no such checkpoint directory or file")
    src_real = os.path.realpath(src if os.path.isdir(src) else os.path.dirname(os.path.abspath(src)))
    dst_real = os.path.realpath(dst)
    part = dst + ".partial"
    for real in (dst_real, os.path.realpath(part)):
        if _inside(real, src_real):
            raise CheckpointError(f"{dst}: the destination is the source checkpoint {src} or inside it; choose a "
                                  f"path outside {src_real}")
        if _inside(src_real, real):
            raise CheckpointError(f"{dst}: the destination contains the source checkpoint {src} (replacing it "
                                  f"would delete the source); choose another path")
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(f"{dst}: already exists (pass overwrite=True / --overwrite to replace it)")
        if os.path.isdir(dst) and not any(f == "config.json" or f.endswith(".safetensors") for f in os.listdir(dst)):
            raise CheckpointError(f"{dst}: is a directory without a checkpoint in it (no config.json or "
                                  f"*.safetensors); refusing to replace it even with --overwrite")
    if os.path.lexists(part) and not os.path.exists(os.path.join(part, _PARTIAL_MARKER)):
        raise CheckpointError(f"{part}: exists but was not made by pykimi; remove it or choose another destination")
    return part


def _unused_name(base: str) -> str:
    name, k = base, 0
    while os.path.lexists(name):
        k += 1
        name = f"{base}{k}"
    return name


def _swap_in(part: str, dst: str) -> None:
    """Move the finished DST.partial to DST; an existing DST (directory or file, overwrite) goes away whole."""
    if not os.path.lexists(dst):
        os.replace(part, dst)
        return
    old = _unused_name(dst + ".old")                    # never a name that holds something of the user's
    os.replace(dst, old)
    os.replace(part, dst)
    if os.path.isdir(old) and not os.path.islink(old):
        shutil.rmtree(old)
    else:
        os.remove(old)


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
    if bits not in FORMATS:
        raise ValueError(f"quantize: bits must be 8 or 4, got {bits!r}")
    if what not in ("experts", "all"):
        raise ValueError(f"quantize: what must be 'experts' or 'all', got {what!r}")
    fmt = FORMATS[bits]
    src_dir, dst_dir = os.fspath(src_dir), os.fspath(dst_dir)
    dst_dir = dst_dir.rstrip("/") or dst_dir
    part = _check_destination(src_dir, dst_dir, overwrite)
    ckpt = Checkpoint.open(src_dir, load_config=False)
    from .variants import is_flat_layout, use_kimi_vl_names
    if is_flat_layout(src_dir):
        use_kimi_vl_names(ckpt)          # Moonlight: select by the one table of names (the repack keeps them)
    if not os.path.isdir(src_dir):
        src_dir = os.path.dirname(os.path.abspath(src_dir))
    if os.path.isfile(os.path.join(src_dir, "config.json")):
        from .config import load_config
        load_config(src_dir)          # a source whose config.json is invalid would give an unloadable repack

    names = ckpt.names()
    infos = {n: ckpt.info(n) for n in names}
    # a source that is itself repacked: NAME.qweight + NAME.scales form one logical weight NAME, which is
    # re-quantized when selected and in another format, else copied as stored (its codes and scales unchanged)
    src_q = {n[:-len(".qweight")]: load_quantized(ckpt, n[:-len(".qweight")]) for n in names
             if n.endswith(".qweight") and n[:-len(".qweight")] + ".scales" in infos}
    chosen = {n for n in names if infos[n].dtype in ("BF16", "F16", "F32")
              and should_quantize(n, infos[n].shape, what)}
    requant = {b for b, qw in src_q.items() if qw.kind != fmt and should_quantize(b, qw.shape, what)}
    qmeta = {n: {"format": fmt, "shape": [int(s) for s in infos[n].shape]} for n in chosen}
    qmeta.update({b: {"format": fmt if b in requant else qw.kind, "shape": [int(s) for s in qw.shape]}
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

    if os.path.exists(part):      # our own marker is in it (checked by _check_destination)
        print(f"pykimi: removing {part}, left by an interrupted repack", file=sys.stderr)
        shutil.rmtree(part)
    try:
        os.makedirs(part)
        open(os.path.join(part, _PARTIAL_MARKER), "w").close()
    except OSError as e:
        shutil.rmtree(part, ignore_errors=True)
        raise CheckpointError(f"{dst_dir}: cannot create the destination ({e.strerror or e}: "
                              f"{e.filename or part})") from None
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
    except BaseException as e:
        if bar is not None:
            bar.close()
        shutil.rmtree(part, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"{dst_dir}: writing the repack failed ({e.strerror or e}"
                                  + (f": {e.filename}" if e.filename else "") + "); nothing was left behind") from None
        raise
    if bar is not None:
        bar.close()
    ckpt.close()
    try:
        _swap_in(part, dst_dir)
    except OSError as e:
        shutil.rmtree(part, ignore_errors=True)
        raise CheckpointError(f"{dst_dir}: cannot move the finished repack into place ({e.strerror or e})") from None
    os.remove(os.path.join(dst_dir, _PARTIAL_MARKER))   # after the swap: a DST.partial without it is never ours
    return {"quantized": len(chosen) + len(requant), "tensors": len(names), "bytes_in": total,
            "bytes_out": out_bytes, "format": fmt, "what": what, "path": dst_dir}
