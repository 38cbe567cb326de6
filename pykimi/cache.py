"""Latent KV cache for MLA (spec §8.3, DESIGN.md "Memory and speed").

Per layer and position the cache keeps only what MLA needs to rebuild keys and values:

    row = [ c (kv_lora_rank, after kv_a_layernorm) | k_pe (qk_rope_head_dim, after RoPE) ]

576 float32 per layer per token for the real model (512 + 64), instead of 16 heads × (192 + 128) for an
expanded cache. Rows of one layer sit in one preallocated [capacity, R + rope] array, so the absorbed decode
score is a single product with ``rows.T`` and ``rows[:, :R]`` is the value-side latent.

The arrays are preallocated (``capacity``) and grow geometrically when a write runs past the end (never past
``max_len``). ``generate`` sizes the cache to prompt + max_new_tokens up front, so decode never reallocates.

Cache dtype (``dtype="f32" | "bf16"``, CLI ``--cache-dtype``): a bf16 cache stores the rows as bf16 bits
(uint16), rounded to nearest even when written (weights.f32_to_bf16, the project's one f32 -> bf16 rounding)
and widened exactly when read (a 16-bit shift: in registers in the C kernels, per block of rows in NumPy).
It halves the cache (27 × 576 × 2 = 31104 bytes per token for the real model); each cached value carries a
relative rounding error of at most 2^-9. Attention itself still computes in f32 (DESIGN.md "Numerics").
"""
from __future__ import annotations

import numpy as np

from .errors import InputError
from .weights import bf16_to_f32, f32_to_bf16

CACHE_DTYPES = ("f32", "bf16")          # the names users give (load(cache_dtype=), --cache-dtype)
_STORAGE = {"f32": np.dtype(np.float32), "bf16": np.dtype(np.uint16)}


def cache_dtype_name(dtype) -> str:
    """'f32' | 'bf16' for a cache dtype given as a name ('f32', 'float32', 'bf16', 'bfloat16') or np.float32;
    InputError (one line) otherwise."""
    if isinstance(dtype, str):
        name = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16"}.get(dtype.lower(), dtype.lower())
        if name in CACHE_DTYPES:
            return name
    else:
        try:
            if np.dtype(dtype) == np.float32:
                return "f32"
        except TypeError:
            pass
    raise InputError(f"cache dtype {dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")


class LatentCache:
    """Growable per-layer latent cache. Position i of the sequence is row i of every layer.

    ``dtype``: "f32" (default) or "bf16" (see the module docstring); ``cache_dtype`` is the name, ``dtype``
    the storage dtype of the rows (float32, or uint16 bits for bf16)."""

    def __init__(self, n_layers: int, kv_lora_rank: int, rope_dim: int, capacity: int = 256,
                 max_len: int | None = None, dtype="f32"):
        self.n_layers = int(n_layers)
        self.kv_lora_rank = int(kv_lora_rank)
        self.rope_dim = int(rope_dim)
        self.width = self.kv_lora_rank + self.rope_dim
        self.max_len = None if max_len is None else int(max_len)
        cap = max(1, int(capacity))
        if self.max_len is not None:
            cap = min(cap, self.max_len)
        self.cache_dtype = cache_dtype_name(dtype)
        self.dtype = _STORAGE[self.cache_dtype]
        self._rows = [np.zeros((cap, self.width), dtype=self.dtype) for _ in range(self.n_layers)]
        self._len = [0] * self.n_layers

    @classmethod
    def for_config(cls, text_cfg, capacity: int = 256, max_len: int | None = None,
                   dtype="f32") -> "LatentCache":
        return cls(text_cfg.num_hidden_layers, text_cfg.kv_lora_rank, text_cfg.qk_rope_head_dim,
                   capacity=capacity, max_len=max_len, dtype=dtype)

    # -- sizes -------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self._rows[0].shape[0] if self._rows else 0

    def __len__(self) -> int:
        """Number of positions held (by layer 0; all layers agree between forward passes)."""
        return self._len[0] if self._len else 0

    def seq_len(self, layer: int) -> int:
        return self._len[layer]

    def bytes_per_token(self) -> int:
        """n_layers × (kv_lora_rank + qk_rope_head_dim) × itemsize -- 27 × 576 × 4 = 62208 for the real model
        (31104 with a bf16 cache)."""
        return self.n_layers * self.width * self.dtype.itemsize

    def nbytes(self) -> int:
        """Bytes currently allocated (capacity, not length)."""
        return sum(r.nbytes for r in self._rows)

    # -- access ------------------------------------------------------------------------------------------
    def rows(self, layer: int) -> np.ndarray:
        """All cached rows of ``layer`` as stored   # [N, R + rope] view (c = [:, :R], k_pe = [:, R:]);
        float32, or uint16 bf16 bits for a bf16 cache (:meth:`rows_f32` widens)."""
        return self._rows[layer][: self._len[layer]]

    def rows_f32(self, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Cached rows start..stop-1 of ``layer`` as float32   # [n, R + rope]: a view of an f32 cache, an
        exact widened copy of a bf16 one (prefill widens one key block at a time)."""
        n = self._len[layer]
        stop = n if stop is None else min(int(stop), n)
        r = self._rows[layer][int(start):stop]
        return bf16_to_f32(r) if self.cache_dtype == "bf16" else r

    def latent(self, layer: int) -> np.ndarray:
        return self.rows_f32(layer)[:, : self.kv_lora_rank]                 # [N, R] f32

    def k_pe(self, layer: int) -> np.ndarray:
        return self.rows_f32(layer)[:, self.kv_lora_rank:]                  # [N, rope] f32

    def reserve(self, n_total: int) -> None:
        """Make room for ``n_total`` positions in every layer (at most max_len)."""
        if self.max_len is not None and n_total > self.max_len:
            raise InputError(f"sequence of {n_total} tokens exceeds the KV cache limit of {self.max_len}")
        for i, r in enumerate(self._rows):
            if r.shape[0] < n_total:
                new_cap = max(n_total, 2 * r.shape[0])
                if self.max_len is not None:
                    new_cap = min(new_cap, self.max_len)
                grown = np.zeros((new_cap, self.width), dtype=self.dtype)
                grown[: self._len[i]] = r[: self._len[i]]
                self._rows[i] = grown

    def write(self, layer: int, c: np.ndarray, k_pe: np.ndarray) -> None:
        """Write rows for new positions of ``layer``   # c [S, R], k_pe [S, rope] f32 (a bf16 cache rounds
        them to nearest even)."""
        S = c.shape[0]
        n0 = self._len[layer]
        if n0 + S > self._rows[layer].shape[0]:
            self.reserve(n0 + S)
        buf = self._rows[layer]
        if self.cache_dtype == "bf16":
            c, k_pe = f32_to_bf16(c), f32_to_bf16(k_pe)
        buf[n0:n0 + S, : self.kv_lora_rank] = c
        buf[n0:n0 + S, self.kv_lora_rank:] = k_pe
        self._len[layer] = n0 + S

    def append(self, layer: int, c: np.ndarray, k_pe: np.ndarray):
        """:meth:`write`, then (latent [N, R], k_pe [N, rope]) f32 over every cached position of that layer:
        views of an f32 cache, widened copies of a bf16 one (the model's paths call write and read
        :meth:`rows_f32` blocks instead)."""
        self.write(layer, c, k_pe)
        return self.latent(layer), self.k_pe(layer)

    def next_row(self, layer: int):
        """Room for ONE new position of ``layer``, for a kernel that writes the row itself (the fused decode
        attention): returns (buffer [capacity, R + rope], n) -- the caller writes row n, then :meth:`commit`."""
        n0 = self._len[layer]
        if n0 + 1 > self._rows[layer].shape[0]:
            self.reserve(n0 + 1)
        return self._rows[layer], n0

    def commit(self, layer: int, n_new: int = 1) -> None:
        """Count ``n_new`` rows written after the held ones (see :meth:`next_row`) as held."""
        if self._len[layer] + n_new > self._rows[layer].shape[0]:
            raise InputError(f"cache layer {layer}: cannot commit {n_new} rows past its capacity")
        self._len[layer] += n_new

    def next_rows(self):
        """:meth:`next_row` of every layer at once (the serve engine's batched step writes one row in each):
        (buffers, ns), lists of each layer's buffer [capacity, R + rope] and its held rows; the caller writes
        row ns[l] of buffers[l], then :meth:`commit_rows`."""
        for layer, n0 in enumerate(self._len):
            if n0 + 1 > self._rows[layer].shape[0]:
                self.reserve(n0 + 1)
        return list(self._rows), list(self._len)

    def commit_rows(self) -> None:
        """:meth:`commit` of one row in every layer (after :meth:`next_rows`)."""
        for layer, n0 in enumerate(self._len):
            if n0 + 1 > self._rows[layer].shape[0]:
                raise InputError(f"cache layer {layer}: cannot commit 1 row past its capacity")
        self._len = [n0 + 1 for n0 in self._len]

    def truncate(self, n: int) -> None:
        """Forget positions >= n in every layer (e.g. to reuse a shared prompt prefix)."""
        self._len = [min(l, int(n)) for l in self._len]

    def reset(self) -> None:
        self.truncate(0)
