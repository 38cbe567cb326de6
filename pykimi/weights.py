"""Memory-mapped safetensors reader and streaming writer.

The reader parses the header itself (8-byte little-endian length, JSON, then the data) and memory-maps the
data region: opening a 32.8 GB checkpoint reads only its headers, and ``get(name)`` returns a zero-copy view
into the page cache. Nothing here ever copies the whole model. bf16 tensors are exposed as their uint16 bits
and widened to float32 by a 16-bit shift (DESIGN.md, Numerics), in bounded tiles.

Every structural problem is a one-line ``CheckpointError`` naming the file and tensor.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import ClassVar, Iterable, Protocol, runtime_checkable

import numpy as np

from .errors import CheckpointError

# safetensors dtype -> (numpy dtype of the raw view, bytes per element)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widen with bf16_to_f32
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
             np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
             np.dtype("<u2"): "U16", np.dtype("<u4"): "U32", np.dtype("<u8"): "U64", np.dtype("?"): "BOOL"}

MAX_HEADER = 100 * 1024 * 1024  # the official library's limit too
TILE_ELEMS = 1 << 22            # widen / quantize at most 4M elements (16 MB of f32) per step
QBLOCK = 32                     # the block of Q8_32 / Q4_32 along `in`: one f32 scale per 32 weights
ALIGN = 64                      # SafetensorsWriter: data start and 64-byte-multiple tensors on this boundary
META_KEY = "pykimi.quant"       # shard metadata of a repacked checkpoint: {NAME: {"format", "shape"}}


# --------------------------------------------------------------------------------- decoding the formats

def bf16_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Exact bf16 -> f32: the bf16 bits are the high half of the f32 bits (uint16 -> uint32 << 16)."""
    bits = np.asarray(bits)
    if out is None:
        out = np.empty(bits.shape, dtype=np.float32)
    o32 = out.view(np.uint32)
    np.left_shift(bits, 16, out=o32, dtype=np.uint32)
    return out


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """f32 -> bf16 bits with round-to-nearest-even (NaN kept quiet)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def dequant_q8(q: np.ndarray, scales: np.ndarray, in_features: int | None = None) -> np.ndarray:
    """Q8_32 -> float32 [rows, in]: W[o, i] = q[o, i] * scales[o, i // 32] (twin of numba_kernels.dequant_q8)."""
    q = np.asarray(q)
    scale_per_col = np.repeat(np.asarray(scales, np.float32), QBLOCK, axis=1)[:, :q.shape[1]]  # [rows, in]
    return q.astype(np.float32) * scale_per_col


def unpack_q4(q: np.ndarray, in_features: int) -> np.ndarray:
    """Q4_32 packed bytes [rows, ceil(in/2)] -> int8 values -8..7 [rows, in] (element 2j: low nibble)."""
    q = np.asarray(q, dtype=np.uint8)
    codes = np.empty((q.shape[0], q.shape[1] * 2), dtype=np.int8)
    codes[:, 0::2] = q & 0x0F  # element 2j: low nibble
    codes[:, 1::2] = q >> 4    # element 2j+1: high nibble
    return codes[:, :in_features] - np.int8(8)


def dequant_q4(q: np.ndarray, scales: np.ndarray, in_features: int) -> np.ndarray:
    """Q4_32 -> float32 [rows, in]: W[o, i] = (code - 8) * scales[o, i // 32] (twin of numba_kernels.dequant_q4)."""
    vals = unpack_q4(q, in_features)
    scale_per_col = np.repeat(np.asarray(scales, np.float32), QBLOCK, axis=1)[:, :in_features]
    return vals.astype(np.float32) * scale_per_col


# ---------------------------------------------------------------------------------- the Weight protocol

KINDS = ("f32", "bf16", "f16", "q8_32", "q4_32")
_STORED_KINDS = {"F32": "f32", "BF16": "bf16", "F16": "f16"}   # safetensors dtype -> weight kind


@runtime_checkable
class Weight(Protocol):
    """A linear weight W [out, in] in its stored form: what kernels.matmul and the stages take.

    name:  the checkpoint tensor name;  shape: (out, in);
    kind:  "f32" | "bf16" | "f16" (a Stored tensor) | "q8_32" | "q4_32" (pykimi-quantized), one spelling each
           (f16 is not one of the kernels' formats: a checkpoint may hold F16 weights, widened in tiles);
    rows(r0, r1):     rows r0:r1 as a Weight of the same kind, a view (nothing read or copied);
    rows_f32(r0, r1): rows r0:r1 widened to a new float32 array [r1 - r0, in];
    f32():            all of W as a new float32 array.
    Stored, Q8Weight and Q4Weight implement it; a float32 ndarray is accepted wherever a Weight is (kind_of,
    f32_rows, rows_of, f32_of below)."""

    name: str
    shape: tuple

    @property
    def kind(self) -> str: ...

    def rows(self, r0: int, r1: int) -> "Weight": ...

    def rows_f32(self, r0: int, r1: int) -> np.ndarray: ...

    def f32(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Stored:
    """A tensor in its stored form: ``data`` is the raw view (BF16 as uint16 bits), zero-copy when read.
    A float tensor is a Weight (kind f32 / bf16 / f16)."""

    name: str
    dtype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    @property
    def kind(self) -> str:
        k = _STORED_KINDS.get(self.dtype)
        if k is None:
            raise CheckpointError(f"tensor {self.name!r} is {self.dtype}, not a float weight "
                                  f"(expected one of {', '.join(_STORED_KINDS)})")
        return k

    def rows(self, r0: int, r1: int) -> "Stored":
        return Stored(self.name, self.dtype, self.data[r0:r1])

    def rows_f32(self, r0: int, r1: int) -> np.ndarray:
        d = self.data[r0:r1]
        return bf16_to_f32(d) if self.dtype == "BF16" else np.asarray(d, dtype=np.float32)

    def f32(self) -> np.ndarray:
        """A new float32 array, widened in bounded tiles (bf16 exact, f16 exact, ints converted)."""
        src = self.data
        out = np.empty(src.shape, dtype=np.float32)
        if src.size == 0:
            return out
        flat_src = src.reshape(-1)
        flat_out = out.reshape(-1)
        for s in range(0, flat_src.size, TILE_ELEMS):
            e = min(s + TILE_ELEMS, flat_src.size)
            if self.dtype == "BF16":
                bf16_to_f32(flat_src[s:e], out=flat_out[s:e])
            else:
                flat_out[s:e] = flat_src[s:e]
        return out


@dataclass(frozen=True)
class _Blocks:
    """A block-quantized weight W [out, in]: codes ``q`` and one f32 scale per block of 32 along ``in``
    (pykimi.quant makes them; the kernels in csrc/ read them directly)."""

    name: str
    shape: tuple
    q: np.ndarray
    scales: np.ndarray      # f32 [out, ceil(in/32)]

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scales.nbytes)

    def rows(self, r0: int, r1: int):
        return dataclasses.replace(self, shape=(r1 - r0,) + tuple(self.shape[1:]), q=self.q[r0:r1],
                                   scales=self.scales[r0:r1])

    def f32(self) -> np.ndarray:
        return self.rows_f32(0, self.shape[0])


@dataclass(frozen=True)
class Q8Weight(_Blocks):
    """Q8_32: q int8 [out, in]; W[o, i] = q[o, i] * scales[o, i // 32]."""

    kind: ClassVar[str] = "q8_32"

    def rows_f32(self, r0: int, r1: int) -> np.ndarray:
        return dequant_q8(self.q[r0:r1], self.scales[r0:r1], self.shape[1])


@dataclass(frozen=True)
class Q4Weight(_Blocks):
    """Q4_32: q uint8 [out, ceil(in/2)], element 2j in the low nibble, code = value + 8;
    W[o, i] = (code - 8) * scales[o, i // 32]."""

    kind: ClassVar[str] = "q4_32"

    def rows_f32(self, r0: int, r1: int) -> np.ndarray:
        return dequant_q4(self.q[r0:r1], self.scales[r0:r1], self.shape[1])


def kind_of(w) -> str:
    """A weight's kind; "f32" for a float32 ndarray."""
    return "f32" if isinstance(w, np.ndarray) else w.kind


def rows_of(w, r0: int, r1: int):
    """Rows r0:r1 of W in its stored form (a view)."""
    return w[r0:r1] if isinstance(w, np.ndarray) else w.rows(r0, r1)


def f32_rows(w, r0: int, r1: int) -> np.ndarray:
    """Rows r0:r1 of W as float32 [r1 - r0, in] (the bounded tile the BLAS path widens)."""
    return np.asarray(w[r0:r1], dtype=np.float32) if isinstance(w, np.ndarray) else w.rows_f32(r0, r1)


def f32_of(w) -> np.ndarray:
    """All of W as float32 (an f32 ndarray as is)."""
    if isinstance(w, np.ndarray):
        return w if w.dtype == np.float32 else w.astype(np.float32)
    return w.f32()


def to_bf16(x: np.ndarray, name: str = "") -> Stored:
    """Round a float array to bf16 and wrap it for the writer."""
    return Stored(name, "BF16", f32_to_bf16(x))


# --------------------------------------------------------------------------------------------- reader

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple
    dtype: str
    nbytes: int
    file: str
    offset: int  # absolute byte offset in the file


def _advise_huge(mm: mmap.mmap) -> None:
    """Ask for 2 MiB pages on the weight mapping (Linux MADV_HUGEPAGE; a no-op elsewhere or when refused).

    Why: decode streams weights that are spread over gigabytes of mapping, and with 4 KiB pages every 4 KiB
    of weights costs a TLB miss. With the advice, the page-cache pages a fault reads in are 2 MiB folios that
    the kernel maps with one entry each (FilePmdMapped in /proc/meminfo) where the filesystem supports large
    folios (ext4, xfs on recent kernels): measured here, the int4 GEMV over the lm_head reads 27-28 GB/s from
    such a mapping and 22-23 GB/s from a 4 KiB one. Pages already cached in small folios stay as they are."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        mm.madvise(advice)
    except (OSError, ValueError):
        pass


def _check_coverage(fname: str, spans: list, data_len: int) -> None:
    """The tensors' byte ranges must tile the data region exactly: sorted by offset, the first starts at 0,
    each starts where the previous ends (no gap, no overlap) and the last ends at the end of the file (the
    safetensors format requires it; the official reader refuses anything else). A header length one byte
    short or long, bytes appended or cut, or offsets shifted by a corruption all fail here instead of
    reading tensors from the wrong bytes. ``spans``: (begin, end, name) relative to the data start."""
    pos, prev = 0, None
    for b, e, name in sorted(spans):
        if b > pos:
            raise CheckpointError(f"{fname}: tensor {name!r}: data_offsets [{b}, {e}] leave a gap of {b - pos} "
                                  f"bytes after offset {pos} (the tensors must tile the data region exactly)")
        if b < pos:
            raise CheckpointError(f"{fname}: tensors {prev!r} and {name!r} overlap in the data (data_offsets "
                                  f"[{b}, {e}] start before {pos})")
        pos, prev = e, name
    if pos != data_len:
        raise CheckpointError(f"{fname}: the tensors cover {pos} bytes of data but the file holds {data_len} after "
                              f"its header (header length wrong, or the file truncated or extended)")


class SafetensorsFile:
    """One .safetensors file: header parsed and validated eagerly, data memory-mapped lazily."""

    def __init__(self, path: str):
        self.path = path
        fname = os.path.basename(path)
        try:
            size = os.path.getsize(path)
            fh = open(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: shard file is missing") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        with fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{fname}: truncated file ({size} bytes; a safetensors file starts with an "
                                      f"8-byte header length)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER:
                raise CheckpointError(f"{fname}: header length {hlen} is over the {MAX_HEADER}-byte limit")
            if 8 + hlen > size:
                raise CheckpointError(f"{fname}: header length {hlen} is larger than the file ({size} bytes); "
                                      f"the file is truncated or not safetensors")
            raw = fh.read(hlen)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{fname}: header is not valid JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{fname}: header is a JSON {type(header).__name__}, expected an object")
        self.metadata = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise CheckpointError(f"{fname}: __metadata__ must be an object of strings")
        self.data_start = 8 + hlen
        data_len = size - self.data_start
        self.infos: dict[str, TensorInfo] = {}
        spans = []
        for name, ent in header.items():
            if not isinstance(ent, dict):
                raise CheckpointError(f"{fname}: tensor {name!r}: header entry is not an object")
            dt = ent.get("dtype")
            shape = ent.get("shape")
            offs = ent.get("data_offsets")
            if dt not in DTYPES:
                raise CheckpointError(f"{fname}: tensor {name!r}: unknown dtype {dt!r} (expected one of "
                                      f"{', '.join(DTYPES)})")
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)):
                raise CheckpointError(f"{fname}: tensor {name!r}: shape {shape!r} is not a list of non-negative "
                                      f"integers")
            if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                    or not 0 <= offs[0] <= offs[1]):
                raise CheckpointError(f"{fname}: tensor {name!r}: data_offsets {offs!r} must be [begin, end] "
                                      f"with 0 <= begin <= end")
            if offs[1] > data_len:
                raise CheckpointError(f"{fname}: tensor {name!r}: data_offsets {offs} run past the data "
                                      f"({data_len} bytes); the file is truncated")
            n = 1
            for d in shape:
                n *= d
            need = n * DTYPES[dt].itemsize
            if offs[1] - offs[0] != need:
                raise CheckpointError(f"{fname}: tensor {name!r}: {offs[1] - offs[0]} bytes stored but dtype "
                                      f"{dt} shape {shape} needs {need}")
            self.infos[name] = TensorInfo(name, tuple(shape), dt, need, path, self.data_start + offs[0])
            spans.append((offs[0], offs[1], name))
        _check_coverage(fname, spans, data_len)
        self._mm = None
        self._size = size

    def _map(self):
        if self._mm is None:
            if self._size == 0:
                raise CheckpointError(f"{os.path.basename(self.path)}: empty file")
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            _advise_huge(self._mm)
        return self._mm

    def get(self, name: str) -> np.ndarray:
        info = self.infos[name]
        dt = DTYPES[info.dtype]
        n = info.nbytes // dt.itemsize
        if n == 0:
            return np.empty(info.shape, dtype=dt)
        if os.path.getsize(self.path) != self._size:
            raise CheckpointError(f"{os.path.basename(self.path)}: file changed size while open")
        arr = np.frombuffer(self._map(), dtype=dt, count=n, offset=info.offset)
        return arr.reshape(info.shape)

    def close(self):
        # views handed out keep the mmap alive through their buffer; closing with live views would raise,
        # so drop our reference and let the GC unmap it.
        self._mm = None


class ReadCounter(dict):
    """tensor name -> calls that handed out its data. ``clear()`` starts a new count and bumps
    ``generation``: the model drops the expert weights it keeps when the generation changes, so the experts
    a step uses after a clear are read (and counted) again -- tests and tutorial 07 see one step's reads."""

    generation = 0

    def clear(self) -> None:
        super().clear()
        self.generation += 1


class Checkpoint:
    """A checkpoint: one .safetensors file, or a directory with model.safetensors or an index + shards.

    ``read_counter`` counts, per tensor name, the calls that hand out its data (get/tensor/weight/f32):
    tests use it to prove that experts no token chose are never read. The model resolves each weight once
    and keeps it (KimiVL.layer_weights, chosen experts on first use) until read_counter.clear().
    """

    def __init__(self, path: str, files: dict[str, SafetensorsFile], where: dict[str, str], config=None):
        self.path = path
        self._files = files
        self._where = where  # tensor name -> file path
        self.config = config
        self.read_counter = ReadCounter()
        self.metadata: dict[str, str] = {}
        for f in files.values():
            self.metadata.update(f.metadata)
        self._quant_meta: dict | None = None
        if config is not None and getattr(config, "layout", "kimi_vl") == "flat":
            from .variants import use_kimi_vl_names
            use_kimi_vl_names(self)          # Moonlight: model.* -> language_model.model.* (one table of names)

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str, load_config: bool = True) -> "Checkpoint":
        path = os.fspath(path)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: no such checkpoint directory or file")
        config = None
        if os.path.isfile(path):
            f = SafetensorsFile(path)
            return cls(os.path.dirname(os.path.abspath(path)), {path: f}, {n: path for n in f.infos})
        if load_config and os.path.exists(os.path.join(path, "config.json")):
            from .config import load_config as _lc
            config = _lc(path)
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    idx = json.load(fh)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{index}: not a readable JSON index ({type(e).__name__})") from None
            wmap = idx.get("weight_map") if isinstance(idx, dict) else None
            if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
                raise CheckpointError(f"{index}: expected an object with \"weight_map\": {{tensor: shard file}}")
            files: dict[str, SafetensorsFile] = {}
            where = {}
            for shard in sorted(set(wmap.values())):
                if os.path.basename(shard) != shard:
                    raise CheckpointError(f"{index}: shard name {shard!r} must be a plain file name")
                sp = os.path.join(path, shard)
                if not os.path.exists(sp):
                    raise CheckpointError(f"{index}: names shard {shard!r}, which is missing from {path}")
                files[sp] = SafetensorsFile(sp)
            for name, shard in wmap.items():
                sp = os.path.join(path, shard)
                if name not in files[sp].infos:
                    raise CheckpointError(f"{index}: names tensor {name!r} in {shard}, but that shard lacks it")
                where[name] = sp
            # tensors a shard holds but the index omits are still readable (HF tolerates it too)
            for sp, f in files.items():
                for n in f.infos:
                    where.setdefault(n, sp)
            return cls(path, files, where, config)
        if os.path.exists(single):
            f = SafetensorsFile(single)
            return cls(path, {single: f}, {n: single for n in f.infos}, config)
        shards = sorted(p for p in os.listdir(path) if p.endswith(".safetensors"))
        if not shards:
            raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors "
                                  f"file")
        files = {os.path.join(path, s): SafetensorsFile(os.path.join(path, s)) for s in shards}
        where = {}
        for sp, f in files.items():
            for n in f.infos:
                if n in where:
                    raise CheckpointError(f"{path}: tensor {n!r} is in both {os.path.basename(where[n])} and "
                                          f"{os.path.basename(sp)}")
                where[n] = sp
        return cls(path, files, where, config)

    # -- queries that never touch data -----------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def __len__(self) -> int:
        return len(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._file(name).infos[name]

    def total_bytes(self) -> int:
        return sum(self.info(n).nbytes for n in self._where)

    def _file(self, name: str) -> SafetensorsFile:
        try:
            return self._files[self._where[name]]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint") from None

    # -- data -------------------------------------------------------------------------------------
    def _count(self, name: str) -> None:
        self.read_counter[name] = self.read_counter.get(name, 0) + 1

    def get(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of the raw stored data (BF16 as uint16 bits)."""
        self._count(name)
        return self._file(name).get(name)

    def tensor(self, name: str) -> Stored:
        f = self._file(name)
        self._count(name)
        return Stored(name, f.infos[name].dtype, f.get(name))

    def f32(self, name: str) -> np.ndarray:
        """A new float32 copy of one tensor, widened in bounded tiles."""
        return self.tensor(name).f32()

    def weight(self, name: str):
        """What the kernels take for a linear weight (a Weight): the Q8Weight / Q4Weight the file holds under
        this name (NAME.qweight + NAME.scales), else the ``Stored`` tensor."""
        if name not in self._where:
            q = load_quantized(self, name)
            if q is not None:
                self._count(name)
                return q
        return self.tensor(name)

    def quant_meta(self) -> dict:
        """{NAME: {"format": "q8_32" | "q4_32", "shape": [out, in]}} of a repacked checkpoint ({} otherwise)."""
        if self._quant_meta is None:
            raw = (self.metadata or {}).get(META_KEY)
            meta = {}
            if raw:
                try:
                    meta = json.loads(raw) if isinstance(raw, str) else dict(raw)
                except (ValueError, TypeError):
                    meta = {}
            self._quant_meta = meta
        return self._quant_meta

    def has_weight(self, name: str) -> bool:
        """Present as a plain or a quantized tensor (header lookup only: no data view, no read count)."""
        return name in self._where or (name + ".qweight" in self._where and name + ".scales" in self._where)

    def expect(self, name: str, shape: Iterable[int], dtypes: Iterable[str] | None = None) -> TensorInfo:
        """Check a tensor the model needs: present, right shape, acceptable dtype (one-line error if not)."""
        info = self.info(name)
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(f"{os.path.basename(info.file)}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"expected {list(shape)} from config.json")
        if dtypes is not None and info.dtype not in dtypes:
            raise CheckpointError(f"{os.path.basename(info.file)}: tensor {name!r} has dtype {info.dtype}, "
                                  f"expected one of {sorted(dtypes)}")
        return info

    def lock_in_memory(self):
        """mlock every file's mapping (pykimi.memlock: why, and the up-front checks) -> memlock.MemoryLock.
        Raises ResourceError (one line) when RAM or RLIMIT_MEMLOCK cannot hold them; nothing is locked then."""
        from .memlock import lock_mappings
        return lock_mappings([f._map() for f in self._files.values()])

    def unlock_memory(self) -> None:
        from .memlock import unlock_mappings
        unlock_mappings([f._mm for f in self._files.values() if f._mm is not None])

    def close(self):
        for f in self._files.values():
            f.close()


def is_quantized(ckpt, name: str) -> bool:
    """True when the checkpoint stores `name` quantized (header lookup only: no data view, no read count)."""
    return (name + ".qweight") in ckpt and (name + ".scales") in ckpt


def load_quantized(ckpt, name: str):
    """The quantized weight stored for `name` (NAME.qweight + NAME.scales), or None if there is none."""
    qname, sname = name + ".qweight", name + ".scales"
    if qname not in ckpt:
        return None
    entry = ckpt.quant_meta().get(name) or {}
    qinfo = ckpt.info(qname)
    kind = entry.get("format") or {"I8": "q8_32", "U8": "q4_32"}.get(qinfo.dtype)
    if kind not in ("q8_32", "q4_32"):
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: tensor {qname!r} has dtype {qinfo.dtype}, "
                              f"expected I8 (q8_32) or U8 (q4_32)")
    if sname not in ckpt:
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: quantized tensor {qname!r} has no {sname!r}")
    q, scales = ckpt.get(qname), ckpt.get(sname)
    rows = q.shape[0] if q.ndim == 2 else -1
    if "shape" in entry:
        shape = tuple(int(s) for s in entry["shape"])
    else:
        shape = (rows, q.shape[1] if kind == "q8_32" else 2 * q.shape[1])
    want_q = (shape[0], shape[1] if kind == "q8_32" else -(-shape[1] // 2))
    want_s = (shape[0], -(-shape[1] // QBLOCK))
    want_dt = "I8" if kind == "q8_32" else "U8"
    if tuple(q.shape) != want_q or qinfo.dtype != want_dt:
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: tensor {qname!r} is {qinfo.dtype}{list(q.shape)}, "
                              f"expected {want_dt}{list(want_q)} for {kind} weight of shape {list(shape)}")
    if tuple(scales.shape) != want_s or scales.dtype != np.float32:
        raise CheckpointError(f"{os.path.basename(qinfo.file)}: tensor {sname!r} is {scales.dtype}"
                              f"{list(scales.shape)}, expected float32{list(want_s)}")
    cls = Q8Weight if kind == "q8_32" else Q4Weight
    return cls(name, shape, q, scales)


# --------------------------------------------------------------------------------------------- writer

def _as_stored(name: str, value) -> Stored:
    if isinstance(value, Stored):
        return value
    arr = np.asarray(value)
    dt = _NP_TO_ST.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
    if dt is None:
        raise CheckpointError(f"tensor {name!r}: cannot store numpy dtype {arr.dtype}")
    return Stored(name, dt, arr)


class SafetensorsWriter:
    """Streaming safetensors writer.

    Tensors are declared up front (``add`` only records name, dtype and shape when given a ``TensorSpec``)
    or buffered: to stay streaming with a known header, use ``plan([(name, dtype, shape), ...])`` and then
    ``write(name, array)`` in the same order; the header is written first and each tensor goes straight to
    disk. ``add(name, array)`` + ``close()`` is the simple path for small files (it keeps the arrays until
    close). The file appears under its final name only after ``close()`` succeeds (written to ``path.tmp``).

    Alignment: the header is padded with spaces (as the format allows) so that the data starts on a 64-byte
    boundary of the file, and in the data the tensors whose size is a multiple of 64 bytes come first (in the
    order given), the rest after them; each write goes to its tensor's offset. So every such tensor -- every
    quantized and bf16 weight matrix of the family -- starts on a 64-byte boundary in the memory map, and the
    kernels' 64-byte loads of a weight row do not straddle two cache lines (the official writer aligns to 8:
    rows of its files' Q4 weights measured 4.8 cycles per 128 weights in L2 against 4.05 aligned, AMD EPYC
    Zen 5). The order of the data is free in the format (readers sort the offsets and ask only that they tile
    the buffer)."""

    def __init__(self, path: str, metadata: dict | None = None):
        self.path = os.fspath(path)
        self.tmp = self.path + ".tmp"
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._pending: list[Stored] = []
        self._plan: list[tuple[str, str, tuple]] | None = None
        self._next = 0
        self._fh = None

    # simple path
    def add(self, name: str, value) -> None:
        if self._plan is not None:
            raise RuntimeError("SafetensorsWriter: add() after plan(); use write()")
        self._pending.append(_as_stored(name, value))

    # streaming path
    def plan(self, entries: Iterable[tuple[str, str, tuple]]) -> None:
        self._plan = [(n, d, tuple(int(s) for s in shp)) for n, d, shp in entries]
        self._open_and_write_header(self._plan)

    def write(self, name: str, value) -> None:
        st = _as_stored(name, value)
        n, d, shp = self._plan[self._next]
        if n != name or d != st.dtype or tuple(st.shape) != shp:
            raise CheckpointError(f"{self.path}: writing {name!r} {st.dtype}{list(st.shape)}, but the plan "
                                  f"expects {n!r} {d}{list(shp)} next")
        self._seek(n)
        self._fh.write(np.ascontiguousarray(st.data).tobytes(order="C"))
        self._next += 1

    def write_parts(self, name: str, parts) -> None:
        """Write the next planned tensor from consecutive raw chunks (arrays of its stored dtype), so a tensor
        larger than memory streams to disk; the chunks must add up to exactly the planned byte count."""
        n, d, shp = self._plan[self._next]
        if n != name:
            raise CheckpointError(f"{self.path}: writing {name!r}, but the plan expects {n!r} next")
        need = int(np.prod(shp, dtype=np.int64)) * DTYPES[d].itemsize
        done = 0
        self._seek(n)
        for part in parts:
            b = np.ascontiguousarray(part).tobytes()
            done += len(b)
            self._fh.write(b)
        if done != need:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {done} bytes written, {d}{list(shp)} needs {need}")
        self._next += 1

    def _open_and_write_header(self, entries):
        header: dict = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        sizes = [int(np.prod(shp, dtype=np.int64)) * DTYPES[d].itemsize for _, d, shp in entries]
        # the 64-byte multiples first, then the rest (class docstring: alignment)
        order = sorted(range(len(entries)), key=lambda i: sizes[i] % ALIGN != 0)
        self._offsets = {}
        off = 0
        for i in order:
            self._offsets[entries[i][0]] = off
            off += sizes[i]
        for (n, d, shp), size in zip(entries, sizes):
            header[n] = {"dtype": d, "shape": list(shp),
                         "data_offsets": [self._offsets[n], self._offsets[n] + size]}
        hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
        hb += b" " * (-(8 + len(hb)) % ALIGN)   # the data starts on a 64-byte boundary of the file
        self._data0 = 8 + len(hb)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._fh = open(self.tmp, "wb")
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)

    def _seek(self, name: str) -> None:
        self._fh.seek(self._data0 + self._offsets[name])

    def close(self) -> None:
        if self._plan is None:
            self._open_and_write_header([(p.name, p.dtype, p.shape) for p in self._pending])
            for s in self._pending:
                self._seek(s.name)
                self._fh.write(np.ascontiguousarray(s.data).tobytes(order="C"))
        elif self._next != len(self._plan):
            self.abort()
            raise CheckpointError(f"{self.path}: only {self._next} of {len(self._plan)} planned tensors written")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest):
        if exc_type is not None:
            self.abort()
            return False
        self.close()
        return False


def save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Write a dict name -> ndarray | Stored to one safetensors file (tmp + rename)."""
    w = SafetensorsWriter(path, metadata)
    for name, value in tensors.items():
        st = _as_stored(name, value)
        w.add(name, Stored(name, st.dtype, st.data))
    w.close()
