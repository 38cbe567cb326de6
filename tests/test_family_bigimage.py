"""Big images (the Thinking-2506 budget, 16,384 patches a picture): preprocessing keeps them whole under that
budget, and the vision attention runs in query tiles -- never a [heads, n, n] matrix -- so its memory stays
bounded while its result is the exact softmax attention."""
import tracemalloc

import numpy as np
from PIL import Image

from pykimi import vision
from pykimi.image import ImageSettings, preprocess_images


def test_2506_budget_image_is_kept_whole():
    s = ImageSettings(in_token_limit=16384)
    img = Image.new("RGB", (1792, 1792), (10, 200, 30))          # 3.2 MP: 128 x 128 patches
    pv, grid = preprocess_images([img], s)
    assert grid.tolist() == [[128, 128]] and pv.shape == (16384, 3, 14, 14)
    pv, grid = preprocess_images([img], ImageSettings(in_token_limit=4096))
    assert int(grid[0, 0]) * int(grid[0, 1]) <= 4096


def test_vision_attention_16k_patches_bounded_memory():
    n, H, D = 16384, 1, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n, H, D), dtype=np.float32) for _ in range(3))
    tracemalloc.start()
    try:
        out = vision.vision_attention(q, k, v, [0, n])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    full = H * n * n * 4                                            # 1 GiB for one head
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB: the attention is not tiled"
    assert peak < full / 5
    # exact attention on a sample of rows, in float64
    rows = rng.choice(n, 24, replace=False)
    s = (q[rows, 0].astype(np.float64) / np.sqrt(D)) @ k[:, 0].astype(np.float64).T        # [24, n]
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v[:, 0].astype(np.float64)
    err = np.abs(out[rows] - ref).max() / np.abs(ref).max()
    assert err < 2e-5, f"tiled attention rel. error {err:.2e}"


def test_vision_attention_tiles_equal_whole():
    """Tile size does not change the result beyond rounding (every tile's softmax is over all keys)."""
    n, H, D = 300, 2, 8
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((n, H, D), dtype=np.float32) for _ in range(3))
    cu = [0, 120, 300]
    a = vision.vision_attention(q, k, v, cu, block_q=7)
    b = vision.vision_attention(q, k, v, cu, block_q=300)
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
