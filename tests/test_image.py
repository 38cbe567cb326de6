"""Image preprocessing (spec §5): golden bit-exactness, the resize / pad / patch rules, modes, bad input."""
import json
import math
import os

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from pykimi.errors import ConfigError, InputError
from pykimi.image import (DEFAULT_SETTINGS, ImageSettings, grid_hw, num_image_tokens, padded_size, preprocess_image,
                          preprocess_images, resized_size)

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
TINY = os.path.join(GOLDEN, "tiny-kimi-vl")


def _case(name):
    d = os.path.join(GOLDEN, name)
    with open(os.path.join(d, "inputs.json")) as f:
        meta = json.load(f)
    return d, meta, load_file(os.path.join(d, "inputs.safetensors"))


def _first_diff(a, b):
    idx = np.argwhere(a.view(np.uint32) != b.view(np.uint32))
    if not len(idx):
        return ""
    i = tuple(idx[0])
    return f"{len(idx)} values differ, first at {i}: {a[i]} vs {b[i]}"


@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_golden_bit_exact(case):
    d, meta, inputs = _case(case)
    settings = ImageSettings.load(TINY)
    paths = [os.path.join(d, im["file"]) for im in meta["images"]]
    pv, grids = preprocess_images(paths, settings)
    ref = inputs["pixel_values"]
    assert pv.dtype == np.float32 and pv.shape == ref.shape
    assert np.array_equal(pv.view(np.uint32), ref.view(np.uint32)), _first_diff(pv, ref)  # bit for bit
    assert grids.dtype == np.int64 and np.array_equal(grids, inputs["image_grid_hws"])
    # the same from PIL images opened by the caller
    pv2, _ = preprocess_images([Image.open(p) for p in paths], settings)
    assert np.array_equal(pv2.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("case", ["one_image", "two_images"])
def test_golden_sizes(case):
    d, meta, _ = _case(case)
    s = ImageSettings.load(TINY)
    p = meta["preprocessing"]
    assert (s.patch_size, s.in_token_limit, list(s.merge_kernel_size), s.pad_input) == (
        p["patch_size"], p["in_token_limit"], p["merge_kernel_size"], p["pad_input"])
    assert list(s.image_mean) == p["image_mean"] and list(s.image_std) == p["image_std"]
    for im in meta["images"]:
        w, h = im["orig_size_wh"]
        assert list(Image.open(os.path.join(d, im["file"])).size) == [w, h]
        assert list(resized_size(w, h, s)) == im["resized_size_wh"]
        assert list(padded_size(*resized_size(w, h, s), s)) == im["padded_size_wh"]
        assert list(grid_hw(w, h, s)) == im["grid_hw"]
        assert num_image_tokens(w, h, s) == im["n_tokens"] and im["n_patches"] == 4 * im["n_tokens"]


def test_default_settings_are_the_reference():
    assert ImageSettings.load() == DEFAULT_SETTINGS == ImageSettings(14, 4096, (2, 2), True, (0.5,) * 3, (0.5,) * 3)
    assert ImageSettings.load(os.path.join(GOLDEN, "text_only")) == DEFAULT_SETTINGS  # no file there -> defaults


def test_spec_token_examples():
    assert num_image_tokens(1024, 768) == 1036            # spec §5: 73*54 <= 4096, pads to 1036x784
    assert grid_hw(1024, 768) == (56, 74)
    # over the limit: s = sqrt(4096/n), truncating sizes
    w, h = 2000, 1500
    n = (w // 14) * (h // 14)
    s = math.sqrt(4096 / n)
    assert resized_size(w, h) == (int(w * s), int(h * s)) == (1038, 778)  # n = 142*107 = 15194
    assert num_image_tokens(w, h) == 28 * 38 == 1064
    assert resized_size(14 * 64, 14 * 64) == (896, 896)  # exactly 4096 patches: no resize


def _reference(img, s=DEFAULT_SETTINGS):
    # the rule written out independently: PIL resize, zero pad, /255, normalize, raster patches
    w, h = img.size
    n = (w // 14) * (h // 14)
    if n > s.in_token_limit:
        sc = math.sqrt(s.in_token_limit / n)
        img = img.resize((int(w * sc), int(h * sc)), Image.BICUBIC)
    a = np.asarray(img.convert("RGB"))
    H, W = -(-a.shape[0] // 28) * 28, -(-a.shape[1] // 28) * 28
    pad = np.zeros((H, W, 3), np.uint8)
    pad[:a.shape[0], :a.shape[1]] = a
    x = (pad.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    out = np.empty((H // 14 * (W // 14), 3, 14, 14), np.float32)
    for r in range(H // 14):
        for c in range(W // 14):
            out[r * (W // 14) + c] = x[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14].transpose(2, 0, 1)
    return out, (H // 14, W // 14)


@pytest.mark.parametrize("size", [(5, 3), (28, 28), (29, 57), (123, 97), (1000, 1100)])
def test_matches_written_out_rule(size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pv, g = preprocess_image(img)
    ref, rg = _reference(img)
    assert g == rg and np.array_equal(pv, ref)
    if size == (1000, 1100):  # 71*78 = 5538 > 4096 patches: resized (860x946) with Pillow bicubic
        assert resized_size(*size) == (860, 946) and g == (68, 62)


def test_padding_is_minus_one_and_layout():
    a = np.full((20, 30, 3), 255, np.uint8)
    a[0, 0] = (0, 128, 255)
    pv, g = preprocess_image(Image.fromarray(a))
    assert g == (2, 4) and pv.shape == (8, 3, 14, 14)
    assert pv[0, 0, 0, 0] == -1.0 and pv[0, 2, 0, 0] == 1.0  # channel-first: R=0 -> -1, B=255 -> 1
    assert pv[0, 1, 0, 0] == (np.float32(128) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    # patch 3 (row 0, col 3) covers x in [42, 56): all padding -> -1
    assert np.all(pv[3] == -1.0)
    # patch 2 (row 0, col 2) covers x in [28, 42): columns 28, 29 are image (1.0), the rest padding
    assert np.all(pv[2, :, :, :2] == 1.0) and np.all(pv[2, :, :, 2:] == -1.0)
    # patch 5 (row 1, col 1) covers y in [14, 28): rows 14..19 image, 20.. padding
    assert np.all(pv[5, :, :6, :] == 1.0) and np.all(pv[5, :, 6:, :] == -1.0)


def test_settings_mean_std_from_dir(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "in_token_limit": 16, "merge_kernel_size": [2, 2], "pad_input": True,
         "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    s = ImageSettings.load(str(tmp_path))
    assert s.in_token_limit == 16
    img = Image.fromarray(np.full((100, 100, 3), 200, np.uint8))
    pv, g = preprocess_image(img, s)
    assert g == (6, 6)  # 7*7 = 49 > 16 patches -> scale 4/7 -> 57x57 -> padded 84x84
    x = np.float32(200) / np.float32(255)
    mean = np.float32([0.48145466, 0.4578275, 0.40821073])
    std = np.float32([0.26862954, 0.26130258, 0.27577711])
    assert np.array_equal(pv[0, :, 0, 0], (x - mean) / std)
    assert np.array_equal(pv[-1, :, -1, -1], (np.float32(0) - mean) / std)  # padding is zero before normalizing


@pytest.mark.parametrize("cfg,msg", [
    ({"patch_size": 0}, "patch_size must be an integer in 1..64"),
    ({"patch_size": 10 ** 6}, "patch_size must be an integer in 1..64"),
    ({"merge_kernel_size": [2]}, "merge_kernel_size must be two integers in 1..8"),
    ({"image_std": [0.5, 0, 0.5]}, "image_std must be 3 finite positive numbers"),
    ({"pad_input": "yes"}, "pad_input must be true or false"),
])
def test_bad_settings(tmp_path, cfg, msg):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=msg) as e:
        ImageSettings.load(str(tmp_path))
    assert "preprocessor_config.json" in str(e.value)
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ImageSettings.load(str(tmp_path))


def test_no_pad_centre_crop():
    s = ImageSettings(pad_input=False)
    a = np.random.default_rng(0).integers(0, 256, (61, 90, 3), dtype=np.uint8)
    pv, g = preprocess_image(Image.fromarray(a), s)
    assert g == (4, 6)  # 61x90 -> crop to 56x84, offsets round(2.5)=2 (top), round(3.0)=3 (left)
    crop = a[2:58, 3:87]
    ref, _ = _reference(Image.fromarray(crop))
    assert np.array_equal(pv, ref)
    assert num_image_tokens(90, 61, s) == 6


# ---------------------------------------------------------------------------- PIL modes


def _rgb_noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_mode_rgba_drops_alpha():
    a = np.random.default_rng(3).integers(0, 256, (30, 41, 4), dtype=np.uint8)
    a[..., 3] = 0  # fully transparent pixels keep their RGB (convert('RGB') does not composite)
    pv, _ = preprocess_image(Image.fromarray(a, "RGBA"))
    ref, _ = _reference(Image.fromarray(np.ascontiguousarray(a[..., :3])))
    assert np.array_equal(pv, ref)


@pytest.mark.parametrize("mode", ["L", "P", "1", "LA", "I", "F", "RGBX"])
def test_modes_equal_convert_then_process(mode):
    # for these modes padding with zeros and converting commute, so converting first gives the same result
    img = _rgb_noise(45, 31).convert(mode)
    pv, g = preprocess_image(img)
    ref, rg = _reference(img.convert("RGB"))
    assert g == rg == (4, 4) and np.array_equal(pv, ref)


def test_mode_i16():
    # 16-bit pixels keep their real range (Pillow's convert('RGB') would clip them to 255: issue 19)
    a = (np.arange(20 * 33, dtype=np.uint16).reshape(20, 33) * 99)
    img = Image.fromarray(a)
    assert img.mode == "I;16"
    pv, g = preprocess_image(img)
    eight = Image.fromarray(((a.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8), "L")
    ref, _ = _reference(eight.convert("RGB"))
    assert g == (2, 4) and np.array_equal(pv, ref)


def test_mode_cmyk_pads_in_its_own_mode():
    # zeros in CMYK are white: padding happens before the RGB conversion (spec §5 step 2), so it turns +1
    img = _rgb_noise(14, 14).convert("CMYK")
    pv, g = preprocess_image(img)
    assert g == (2, 2)
    assert np.all(pv[1:] == 1.0)  # patches 1..3 are all padding: white, not black
    ref, _ = _reference(img.convert("RGB"))
    assert np.array_equal(pv[0], ref[0])  # the image patch is the plain conversion


def test_mode_p_large_is_resized_nearest():
    img = _rgb_noise(1200, 1000).convert("P")
    pv, g = preprocess_image(img)
    nw, nh = resized_size(1200, 1000)
    small = img.resize((nw, nh), Image.BICUBIC)  # Pillow itself switches P images to NEAREST
    ref, rg = _reference(small)
    assert g == rg and np.array_equal(pv, ref)


# ---------------------------------------------------------------------------- bad input


def _one_line(e):
    return "\n" not in str(e.value)


def test_missing_path(tmp_path):
    p = str(tmp_path / "nope.png")
    with pytest.raises(InputError, match="nope.png.*file not found") as e:
        preprocess_image(p)
    assert _one_line(e)
    with pytest.raises(InputError, match="not a file"):
        preprocess_image(str(tmp_path))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(tmp_path, fmt):
    p = tmp_path / f"img.{fmt.lower()}"
    _rgb_noise(200, 150).save(p, fmt)
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match="truncated or corrupt") as e:
        preprocess_image(str(p))
    assert _one_line(e) and "img." in str(e.value)


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(InputError, match="not a readable image file"):
        preprocess_image(str(p))
    with pytest.raises(InputError, match="expected a PIL.Image or a file path, got int"):
        preprocess_image(42)


def test_zero_size():
    with pytest.raises(InputError, match=r"zero-size image \(0x5\)"):
        preprocess_image(Image.new("RGB", (0, 5)))


def test_decompression_bomb(tmp_path, monkeypatch):
    p = tmp_path / "bomb.png"
    _rgb_noise(100, 100).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 px > 2x the limit -> Pillow refuses
    with pytest.raises(InputError, match="bomb.png.*decompression-bomb") as e:
        preprocess_image(str(p))
    assert _one_line(e)


def test_position_limit():
    # 7168 px wide = 512 patches: the 512x512 vision position table is reached (spec §5 step 3)
    img = Image.new("RGB", (7168, 20))
    with pytest.raises(InputError, match=r"512x2 patch grid|2x512 patch grid") as e:
        preprocess_image(img)
    assert _one_line(e)
    with pytest.raises(InputError, match="patch grid"):
        preprocess_image(Image.new("L", (20, 7160)))  # 7160 -> padded 7168 -> 512 rows
    pv, g = preprocess_image(Image.new("RGB", (7140, 20)))  # 510 columns is fine
    assert g == (2, 510) and pv.shape == (1020, 3, 14, 14)


def test_preprocess_images_names_the_image(tmp_path):
    good = _rgb_noise(30, 30)
    with pytest.raises(InputError, match="image 1"):
        preprocess_images([good, Image.new("RGB", (5, 0))])
    pv, g = preprocess_images([])
    assert pv.shape == (0, 3, 14, 14) and g.shape == (0, 2) and g.dtype == np.int64
