"""Image preprocessing, exactly as HF ``KimiVLImageProcessor`` (spec §5).

For each image, in order:
  1. (w, h) = PIL size; n = (w//14)*(h//14); if n > in_token_limit resize to (int(w*s), int(h*s)),
     s = sqrt(limit/n), with Pillow BICUBIC in the image's own mode. Never upscale.
  2. pad right/bottom with zeros to multiples of patch*merge (28), still in the original mode
     (torchvision ``pad`` on a PIL image = ``ImageOps.expand(fill=0)``); pad_input=false centre-crops instead.
  3. a padded side of >= 512 patches is refused (the 2-D RoPE table is 512x512).
  4. convert('RGB'), uint8/255 in float32, (x - mean)/std per channel. (16-bit and float single-channel
     images are first mapped to 8 bits with their real range, see ``to_8bit``: Pillow would clip them.)
  5. patchify in raster order into [gh*gw, 3, 14, 14] (C, ky, kx), grid_hw = (H/14, W/14).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError, InputError

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

POS_EMB_LIMIT = 512  # the vision 2-D RoPE table is 512x512 patches (spec §5 step 3)


@dataclass(frozen=True)
class ImageSettings:
    """The image-processor settings (spec §5); ``ImageSettings.load(dir)`` reads preprocessor_config.json."""
    patch_size: int = 14
    in_token_limit: int = 4096
    merge_kernel_size: tuple[int, int] = (2, 2)
    pad_input: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict, source: str = "preprocessor_config.json") -> "ImageSettings":
        def pos_int(key, default, hi):
            v = d.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
                raise ConfigError(f"{source}: {key} must be an integer in 1..{hi}, got {v!r}")
            return v

        def triple(key, default, positive):
            v = d.get(key, default)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                v = [v] * 3
            if (not isinstance(v, (list, tuple)) or len(v) != 3
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                               for x in v)
                    or (positive and not all(x > 0 for x in v))):
                raise ConfigError(f"{source}: {key} must be 3 finite {'positive ' if positive else ''}numbers, "
                                  f"got {v!r}")
            return tuple(float(x) for x in v)

        mk = d.get("merge_kernel_size", [2, 2])
        if isinstance(mk, int) and not isinstance(mk, bool):
            mk = [mk, mk]
        if (not isinstance(mk, (list, tuple)) or len(mk) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 8 for x in mk)):
            raise ConfigError(f"{source}: merge_kernel_size must be two integers in 1..8, got {mk!r}")
        pad = d.get("pad_input", True)
        if not isinstance(pad, bool):
            raise ConfigError(f"{source}: pad_input must be true or false, got {pad!r}")
        # bounds far above the released settings (14, 4096, 2x2) that keep a padded image within reach of
        # memory: sides < 512 patches of at most 64 px
        return cls(patch_size=pos_int("patch_size", 14, 64), in_token_limit=pos_int("in_token_limit", 4096, 1 << 18),
                   merge_kernel_size=(int(mk[0]), int(mk[1])), pad_input=pad,
                   image_mean=triple("image_mean", [0.5] * 3, False),
                   image_std=triple("image_std", [0.5] * 3, True))

    @classmethod
    def load(cls, path: str | None = None) -> "ImageSettings":
        """From a preprocessor_config.json file or a directory holding one; the built-in reference
        settings (data/preprocessor_config.json) when ``path`` is None or the directory has none."""
        if path is not None and os.path.isdir(path):
            path = os.path.join(path, "preprocessor_config.json")
            if not os.path.isfile(path):
                path = None
        if path is None:
            path = os.path.join(_DATA, "preprocessor_config.json")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(d, path)

    @property
    def pad_multiple(self) -> tuple[int, int]:
        """(height, width) multiple of the padded size: patch * merge = 28."""
        return self.patch_size * self.merge_kernel_size[0], self.patch_size * self.merge_kernel_size[1]


DEFAULT_SETTINGS = ImageSettings()


def _settings(s: ImageSettings | None) -> ImageSettings:
    return DEFAULT_SETTINGS if s is None else s


# ----------------------------------------------------------------------------------------------------
# sizes (pure arithmetic, spec §5 steps 1-3 and 6)


def resized_size(w: int, h: int, settings: ImageSettings | None = None) -> tuple[int, int]:
    """Size after step 1: downscale (truncating) when the patch count exceeds in_token_limit."""
    s = _settings(settings)
    p = s.patch_size
    n = (w // p) * (h // p)
    if n <= s.in_token_limit:
        return w, h
    scale = math.sqrt(s.in_token_limit / n)
    return int(w * scale), int(h * scale)


def padded_size(w: int, h: int, settings: ImageSettings | None = None) -> tuple[int, int]:
    """Size after step 2: padded up (pad_input) or centre-cropped down to multiples of patch*merge.

    HF crops to multiples of 14 when pad_input is false; an odd grid then fails in the 2x2 merger, and
    for every even grid the two rules agree, so the crop here goes to multiples of 28 (spec §5 step 2)."""
    s = _settings(settings)
    mh, mw = s.pad_multiple
    if s.pad_input:
        return w + (mw - w % mw) % mw, h + (mh - h % mh) % mh
    return w - w % mw, h - h % mh


def num_image_tokens(w: int, h: int, settings: ImageSettings | None = None) -> int:
    """LM tokens for a w x h image: ceil(h'/28) * ceil(w'/28) after the resize rule (spec §5 step 6)."""
    s = _settings(settings)
    pw, ph = padded_size(*resized_size(w, h, s), s)
    return (ph // s.pad_multiple[0]) * (pw // s.pad_multiple[1])


def grid_hw(w: int, h: int, settings: ImageSettings | None = None) -> tuple[int, int]:
    """(gh, gw) patches of a w x h image after resize and padding."""
    s = _settings(settings)
    pw, ph = padded_size(*resized_size(w, h, s), s)
    return ph // s.patch_size, pw // s.patch_size


# ----------------------------------------------------------------------------------------------------
# loading


def _describe(img, name) -> str:
    if name is not None:
        return f"image {name}"
    if isinstance(img, (str, os.PathLike)):
        return f"image {os.fspath(img)!r}"
    fn = getattr(img, "filename", "")  # a PIL image opened from a file remembers its path
    return f"image {fn!r}" if isinstance(fn, str) and fn else "image"


def load_image(img, name: str | None = None):
    """A PIL image (pixels loaded) from a PIL image or a path; one-line InputError for a missing,
    unreadable, truncated, zero-size or decompression-bomb image."""
    from PIL import Image, UnidentifiedImageError

    what = _describe(img, name)
    if isinstance(img, (str, os.PathLike)):
        path = os.fspath(img)
        if not os.path.exists(path):
            raise InputError(f"{what}: file not found")
        if not os.path.isfile(path):
            raise InputError(f"{what}: not a file")
        _check_png_crcs(path, what)
        try:
            with warnings.catch_warnings():
                # Pillow only warns between MAX_IMAGE_PIXELS and twice that, then decodes hundreds of MB: refuse
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as im:
                    im.load()
                    img = im
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise InputError(f"{what}: refused by Pillow's decompression-bomb limit ({_first_line(e)}); "
                             f"raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted") from None
        except UnidentifiedImageError:
            raise InputError(f"{what}: not a readable image file") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{what}: truncated or corrupt image ({_first_line(e)})") from None
        except Exception as e:  # noqa: BLE001 -- a decoder tripping over damaged bytes (struct.error, IndexError..)
            raise InputError(f"{what}: corrupt image ({type(e).__name__}: {_first_line(e)})") from None
    elif isinstance(img, Image.Image):
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise InputError(f"{what}: refused by Pillow's decompression-bomb limit ({_first_line(e)})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise InputError(f"{what}: truncated or corrupt image ({_first_line(e)})") from None
    else:
        raise InputError(f"{what}: expected a PIL.Image or a file path, got {type(img).__name__}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise InputError(f"{what}: zero-size image ({w}x{h})")
    return img


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png_crcs(path: str, what: str) -> None:
    """A PNG's chunks each carry a CRC-32, but Pillow does not check the image-data chunks' ones and stops
    inflating once it has every row, so a damaged byte can decode to different pixels without an error (found by
    tests/test_fuzz.py). Walk the chunks up to IEND and check every CRC: a damaged PNG is refused instead."""
    import zlib

    def bad(why):
        return InputError(f"{what}: truncated or corrupt image ({why})")

    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _PNG_SIGNATURE:
                return                                  # not a PNG: Pillow decides
            while True:
                head = fh.read(8)
                if len(head) < 8:
                    raise bad("PNG without its IEND chunk")
                n = int.from_bytes(head[:4], "big")
                name = head[4:].decode("latin-1")
                if n > 0x7FFFFFFF:
                    raise bad(f"PNG chunk length {n} over the format's limit")
                data = fh.read(n)                       # at most what the file holds
                crc = fh.read(4)
                if len(data) < n or len(crc) < 4:
                    raise bad(f"PNG chunk {name!r} cut short")
                if zlib.crc32(head[4:] + data) != int.from_bytes(crc, "big"):
                    raise bad(f"PNG chunk {name!r} fails its CRC check")
                if name == "IEND":
                    return
    except OSError as e:
        raise InputError(f"{what}: cannot read ({e.strerror or e})") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# ----------------------------------------------------------------------------------------------------
# preprocessing


def resize_and_pad(img, settings: ImageSettings | None = None, name: str | None = None):
    """Steps 1-3 on a loaded PIL image, in its original mode -> PIL image of the padded size."""
    from PIL import Image, ImageOps

    s = _settings(settings)
    what = _describe(img, name)
    w, h = img.size
    nw, nh = resized_size(w, h, s)
    if (nw, nh) != (w, h):
        if nw <= 0 or nh <= 0:
            raise InputError(f"{what}: {w}x{h} would shrink to {nw}x{nh} under in_token_limit {s.in_token_limit}")
        try:
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)  # Pillow's own bicubic for bit-exactness (§5.1)
        except (ValueError, OSError) as e:
            raise InputError(f"{what}: Pillow cannot resize mode {img.mode} ({_first_line(e)})") from None
    pw, ph = padded_size(nw, nh, s)
    if pw <= 0 or ph <= 0:
        raise InputError(f"{what}: {nw}x{nh} is smaller than one {s.pad_multiple[1]}x{s.pad_multiple[0]} "
                         f"cell and pad_input is false")
    gh, gw = ph // s.patch_size, pw // s.patch_size
    if gh >= POS_EMB_LIMIT or gw >= POS_EMB_LIMIT:  # spec §5 step 3 ("Exceed pos emb")
        raise InputError(f"{what}: {w}x{h} gives a {gh}x{gw} patch grid; each side must be < {POS_EMB_LIMIT} "
                         f"(the vision position table is {POS_EMB_LIMIT}x{POS_EMB_LIMIT})")
    if s.pad_input:
        if (pw, ph) != (nw, nh):
            # zeros in the original mode, right/bottom only (torchvision pad on PIL = ImageOps.expand)
            img = ImageOps.expand(img, border=(0, 0, pw - nw, ph - nh), fill=0)
    else:
        # centre crop (torchvision center_crop offsets: int(round(diff / 2)))
        left, top = int(round((nw - pw) / 2.0)), int(round((nh - ph) / 2.0))
        img = img.crop((left, top, left + pw, top + ph))
    return img


def to_rgb_array(img, name: str | None = None) -> np.ndarray:
    """convert('RGB') -> uint8 [H, W, 3] (step 4; RGBA drops alpha, P uses its palette, as the reference)."""
    try:
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    except (ValueError, OSError) as e:
        raise InputError(f"{_describe(img, name)}: Pillow cannot convert mode {img.mode} to RGB "
                         f"({_first_line(e)})") from None
    return np.asarray(rgb, dtype=np.uint8)


def normalize(rgb: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: x/255 in float32 (torchvision to_tensor), then (x - m)/s."""
    x = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)   # [3, H, W]
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    sd = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (x - m) / sd                                                   # [3, H, W] f32


def patchify(x: np.ndarray, patch: int) -> np.ndarray:
    """[C, H, W] -> [(H/p)*(W/p), C, p, p], patches in raster order, each laid out (C, ky, kx) (§5.5)."""
    c, H, W = x.shape
    gh, gw = H // patch, W // patch
    x = x.reshape(c, gh, patch, gw, patch)                                # [C, gh, ky, gw, kx]
    return np.ascontiguousarray(x.transpose(1, 3, 0, 2, 4)).reshape(gh * gw, c, patch, patch)


def to_8bit(img, name: str | None = None):
    """Wide-range single-channel images -> mode 'L' with their real range, before any other step.

    Pillow's convert('RGB') clips 16-bit pixels ('I;16*', and 'I' as older Pillow opens 16-bit PNGs) to
    0..255, so a 16-bit PNG became all white (issue 19; HF's processor does the same, a deliberate departure
    from spec §5 step 4 for these modes only). The real range is mapped instead: v -> round(v * 255 / 65535).
    An 'I' image whose values are all in 0..255 is 8-bit data in a wide mode and keeps Pillow's conversion;
    'I' values outside 0..65535 are refused, as are NaN / inf pixels of a float ('F') image, rather than
    guessed. Every other mode is returned unchanged (the spec's path)."""
    from PIL import Image

    mode = img.mode
    if mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return img
    what = _describe(img, name)
    a = np.asarray(img)
    if mode == "F":
        if not np.isfinite(a).all():
            raise InputError(f"{what}: float image (mode F) holds NaN or inf pixels")
        return img
    a = a.astype(np.int64)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    if mode == "I":
        if 0 <= lo and hi <= 255:
            return img
        if lo < 0 or hi > 65535:
            raise InputError(f"{what}: 32-bit integer image (mode I) with values in [{lo}, {hi}]; expected 8-bit "
                             f"(0..255) or 16-bit (0..65535) data")
    out = (a * 255 + 32767) // 65535          # round(v * 255 / 65535), exact in integers
    return Image.fromarray(out.astype(np.uint8), mode="L")


def preprocess_image(img, settings: ImageSettings | None = None, name: str | None = None):
    """One image (PIL or path) -> (pixel_values f32[gh*gw, 3, p, p], grid_hw (gh, gw))."""
    s = _settings(settings)
    img = to_8bit(load_image(img, name), name)
    img = resize_and_pad(img, s, name)
    x = normalize(to_rgb_array(img, name), s.image_mean, s.image_std)  # [3, H, W]
    gh, gw = x.shape[1] // s.patch_size, x.shape[2] // s.patch_size
    return patchify(x, s.patch_size), (gh, gw)


def preprocess_images(images, settings: ImageSettings | None = None):
    """Images in order -> (pixel_values f32[sum N, 3, p, p] concatenated, image_grid_hws int64[n, 2])."""
    s = _settings(settings)
    pvs, grids = [], []
    for k, img in enumerate(images):
        nm = repr(os.fspath(img)) if isinstance(img, (str, os.PathLike)) else str(k)
        pv, g = preprocess_image(img, s, name=nm)
        pvs.append(pv)
        grids.append(g)
    if not pvs:
        p = s.patch_size
        return np.zeros((0, 3, p, p), np.float32), np.zeros((0, 2), np.int64)
    return np.concatenate(pvs, axis=0), np.asarray(grids, dtype=np.int64).reshape(-1, 2)
