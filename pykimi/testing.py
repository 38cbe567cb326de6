"""Checkpoint writers for tests and benchmarks: random Kimi-VL checkpoints for any config in the exact HF
layout (tensor names from pykimi.layout, sharded with an index, bf16 or f32, e_score_correction_bias in f32,
per-layer ``rotary_emb.inv_freq`` present like the released checkpoint), written tensor by tensor so that a
full-size 32.8 GB checkpoint streams to disk in bounded memory. Also the two helpers every test or benchmark
that starts a server needs: a free loopback port and a plain HTTP GET.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import urllib.request
import zlib
from typing import Callable

import numpy as np

from .config import KimiVLConfig
from .errors import CheckpointError
from .layout import expected_tensors, stored_dtype
from .weights import DTYPES, Checkpoint, SafetensorsWriter, Stored, f32_to_bf16
from .weights import TILE_ELEMS as CHUNK  # elements generated per step (16 MB of f32)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (servers in tests and benchmarks listen on loopback only)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2.0) -> tuple:
    """GET url -> (status, body bytes); raises on a refused connection or an HTTP error status."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0xFFFFFFFF


def random_tensor_f32(name: str, shape: tuple, seed: int, std: float = 0.02) -> np.ndarray:
    """Deterministic per name: norms ~ 1 (+ small noise), biases small, weights uniform with the given std."""
    rng = np.random.default_rng(_name_seed(seed, name))
    n = int(np.prod(shape, dtype=np.int64))
    if name.endswith(".inv_freq"):
        raise ValueError("inv_freq is computed, not random")
    if "norm" in name.split(".")[-2] and name.endswith(".weight"):
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).reshape(shape)
    if name.endswith("e_score_correction_bias"):
        return (0.05 * rng.standard_normal(n, dtype=np.float32)).reshape(shape)
    if name.endswith("pos_emb.weight"):
        return (0.1 * rng.standard_normal(n, dtype=np.float32)).reshape(shape)
    a = np.float32(std * np.sqrt(3.0))  # uniform(-a, a) has std `std`; uniform is much faster to draw
    out = rng.random(n, dtype=np.float32)
    out *= 2 * a
    out -= a
    return out.reshape(shape)


def _stream_random(name: str, shape: tuple, dtype: str, seed: int, theta: float | None):
    """Yield the tensor as stored bytes-compatible arrays in chunks (bounded memory)."""
    if name.endswith(".inv_freq"):
        # what a bf16 checkpoint stores: the bf16-rounded inv_freq (it must be ignored by loaders)
        dim = shape[0] * 2
        inv = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)
        yield inv if dtype == "F32" else f32_to_bf16(inv)
        return
    n = int(np.prod(shape, dtype=np.int64))
    if n <= CHUNK or len(shape) < 2:
        x = random_tensor_f32(name, shape, seed).reshape(-1)
        yield x if dtype == "F32" else f32_to_bf16(x)
        return
    # large tensors: generate row blocks with per-block seeds (same values regardless of chunking order)
    rows = shape[0]
    per_row = n // rows
    step = max(1, CHUNK // per_row)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        x = random_tensor_f32(f"{name}#{r0}", (r1 - r0,) + tuple(shape[1:]), seed).reshape(-1)
        yield x if dtype == "F32" else f32_to_bf16(x)


def _counted(parts, bar):
    for part in parts:
        yield part
        if bar:
            bar.update(part.nbytes)


def write_checkpoint(out_dir: str, config: dict, tensor_fn: Callable[[str, tuple, str], object] | None = None,
                     dtype: str = "BF16", seed: int = 0, shard_bytes: int = 4 << 30, progress: bool = False,
                     extra_files: dict | None = None) -> str:
    """Write a Kimi-VL checkpoint for ``config`` (a config.json dict) to ``out_dir``.

    ``tensor_fn(name, shape, dtype)`` may return an array (f32, widened by us) for a tensor; by default the
    weights are random and deterministic in (seed, name). Shards of at most ``shard_bytes`` plus
    model.safetensors.index.json are written (a single model.safetensors when everything fits in one).
    """
    if dtype not in ("BF16", "F32"):
        raise ValueError(f"dtype must be BF16 or F32, not {dtype!r}")
    cfg = KimiVLConfig.from_dict(config)
    entries = [(n, s, stored_dtype(n, dtype)) for n, s in expected_tensors(cfg)]
    shards: list[list] = [[]]
    size = 0
    for n, s, d in entries:
        nb = int(np.prod(s, dtype=np.int64)) * DTYPES[d].itemsize
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((n, s, d))
        size += nb
    os.makedirs(out_dir, exist_ok=True)
    k = len(shards)
    names = ["model.safetensors"] if k == 1 else [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
    total = sum(int(np.prod(s, dtype=np.int64)) * DTYPES[d].itemsize for n, s, d in entries)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing checkpoint")
    theta = cfg.text.rope_theta
    weight_map = {}
    for fname, shard in zip(names, shards):
        w = SafetensorsWriter(os.path.join(out_dir, fname), metadata={"format": "pt"})
        w.plan([(n, d, s) for n, s, d in shard])
        try:
            for n, s, d in shard:
                weight_map[n] = fname
                custom = tensor_fn(n, s, d) if tensor_fn is not None else None
                if custom is not None:
                    arr = np.asarray(custom, dtype=np.float32).reshape(s)
                    data = arr if d == "F32" else f32_to_bf16(arr)
                    w.write(n, Stored(n, d, data))
                    if bar:
                        bar.update(data.nbytes)
                    continue
                # stream chunk by chunk straight into the open file
                w.write_parts(n, _counted(_stream_random(n, s, d, seed, theta), bar))
            w.close()
        except BaseException:
            w.abort()
            raise
    if bar:
        bar.close()
    if k > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=1)
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(config, fh, indent=1)
    for fname, content in (extra_files or {}).items():
        with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as fh:
            fh.write(content if isinstance(content, str) else json.dumps(content, indent=1))
    return out_dir


def write_random_checkpoint(out_dir: str, config: dict, dtype: str = "BF16", seed: int = 0,
                            shard_bytes: int = 4 << 30, progress: bool = False) -> str:
    """A random Kimi-VL checkpoint for any config.json dict, in the exact HF layout."""
    return write_checkpoint(out_dir, config, None, dtype, seed, shard_bytes, progress)


def reference_config(**text_overrides) -> dict:
    """The released model's config.json as a dict, with optional text_config overrides (e.g. num_hidden_layers)."""
    here = os.path.join(os.path.dirname(__file__), "data", "reference_config.json")
    with open(here) as fh:
        cfg = json.load(fh)
    cfg["text_config"].update(text_overrides)
    return cfg


def convert_checkpoint(src: str, dst: str, dtype: str = "F32", shard_bytes: int = 4 << 30) -> str:
    """Re-write a checkpoint with every bf16/f16/f32 tensor stored as ``dtype`` (values widened exactly;
    narrowing to BF16 rounds to nearest even). Non-weight files (config, tokenizer, ...) are copied."""
    ck = Checkpoint.open(src)
    if ck.config is None:
        raise CheckpointError(f"{src}: config.json is missing")

    def fn(name, shape, d):
        return ck.f32(name) if name in ck else None

    with open(os.path.join(src, "config.json")) as fh:
        config = json.load(fh)
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "model.safetensors.index.json" and f != "config.json":
            p = os.path.join(src, f)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(dst, f))
    return write_checkpoint(dst, config, fn, dtype=dtype, shard_bytes=shard_bytes)
