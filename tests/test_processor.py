"""Processor (spec §4-5): the golden inputs rebuilt from text + PNGs on a copy of the tiny checkpoint."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from pykimi.errors import ConfigError, InputError, TokenizerError
from pykimi.processor import Processor
from pykimi.tokenizer import train_bpe, write_tiktoken_model

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
TINY = os.path.join(GOLDEN, "tiny-kimi-vl")
CASES = ("text_only", "one_image", "two_images")


def _golden(case):
    d = os.path.join(GOLDEN, case)
    with open(os.path.join(d, "inputs.json")) as f:
        meta = json.load(f)
    return d, meta, load_file(os.path.join(d, "inputs.safetensors"))


def _golden_ranks():
    # a 256-token byte-level vocabulary (no merges: one id per byte) whose ranks send printable ASCII
    # characters to the random text ids the golden prompts use, so those prompts are writable as text
    used = sorted({i for c in CASES for i in _golden(c)[2]["input_ids"].tolist() if i < 256})
    chars = [c for c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"][:len(used)]
    assert len(chars) == len(used)
    ranks = dict(zip((bytes([c]) for c in chars), used))
    free = iter(sorted(set(range(256)) - set(used)))
    for b in range(256):
        if bytes([b]) not in ranks:
            ranks[bytes([b])] = next(free)
    return ranks


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # the tiny checkpoint's small files + a synthetic tiktoken.model: 256 base + 256 special = 512 ids
    d = tmp_path_factory.mktemp("tiny")
    for name in ("config.json", "preprocessor_config.json"):
        shutil.copy(os.path.join(TINY, name), d / name)
    write_tiktoken_model(str(d / "tiktoken.model"), _golden_ranks())
    return d


@pytest.fixture(scope="module")
def proc(tiny_dir):
    return Processor.from_pretrained(str(tiny_dir))


def test_ids_and_settings(proc):
    _, meta, _ = _golden("one_image")
    tok = proc.tokenizer
    assert tok.n_vocab == 512
    for name, i in meta["special_ids"].items():
        assert tok.special_ids[name] == i
    assert proc.media_placeholder_token_id == meta["media_placeholder_token_id"] == tok.media_pad_id == 277
    assert proc.stop_ids == [257, 258]
    assert proc.image_settings.in_token_limit == 4096 and proc.image_settings.merge_kernel_size == (2, 2)


def _prompt_text(proc, ids):
    # collapse each run of placeholders to one <|media_pad|>, then write the ids as text
    out = []
    for i in ids.tolist():
        if not (i == 277 and out and out[-1] == 277):
            out.append(i)
    return proc.tokenizer.decode(out)


@pytest.mark.parametrize("case", CASES)
def test_golden_inputs_rebuilt(proc, case):
    d, meta, inputs = _golden(case)
    text = _prompt_text(proc, inputs["input_ids"])
    images = [os.path.join(d, im["file"]) for im in meta.get("images", [])]
    out = proc(text=text, images=images)
    assert out["input_ids"].dtype == np.int64
    assert np.array_equal(out["input_ids"], inputs["input_ids"])  # placeholders expanded to (gh*gw)/4
    assert len(out["input_ids"]) == meta["seq_len"]
    if images:
        assert int((out["input_ids"] == 277).sum()) == meta["n_placeholders"]
        assert np.array_equal(out["pixel_values"].view(np.uint32), inputs["pixel_values"].view(np.uint32))
        assert np.array_equal(out["image_grid_hws"], inputs["image_grid_hws"])
    else:
        assert out["pixel_values"] is None and out["image_grid_hws"] is None


def test_prepare_from_messages(proc):
    d, meta, inputs = _golden("two_images")
    paths = [os.path.join(d, im["file"]) for im in meta["images"]]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Compare "},
                                          {"type": "image", "image": paths[0]},
                                          {"type": "text", "text": " with "},
                                          {"type": "image", "image": Image.open(paths[1])},
                                          {"type": "text", "text": "ABC"}]}]
    text = proc.apply_chat_template(msgs)
    assert text.count("<|media_pad|>") == 2 and text.endswith("<|im_assistant|>assistant<|im_middle|>")
    out = proc.prepare(msgs)
    ref = proc(text=text, images=paths)
    for k in ("input_ids", "pixel_values", "image_grid_hws"):
        assert np.array_equal(out[k], ref[k])
    ids = out["input_ids"]
    assert int((ids == 277).sum()) == 6 + 63
    assert ids[0] == proc.tokenizer.special_ids["<|im_system|>"] and ids[-1] == 273
    # parts without an inline picture take images= in order
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}, {"type": "image"}]}]
    out2 = proc.prepare(bare, images=paths)
    assert np.array_equal(out2["pixel_values"], ref["pixel_values"])


def test_text_only_and_decode(proc):
    out = proc(text="<|im_user|>user<|im_middle|>ABC<|im_end|>")
    assert out["pixel_values"] is None and out["input_ids"].tolist()[0] == 259 and out["input_ids"][-1] == 258
    assert proc.decode(out["input_ids"]) == "<|im_user|>user<|im_middle|>ABC<|im_end|>"
    assert proc.decode(out["input_ids"], skip_special=True) == "userABC"
    out = proc.prepare([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert proc.decode(out["input_ids"]) == proc.apply_chat_template([{"role": "user", "content": "hi"}], False)


@pytest.mark.parametrize("n_pads,n_images", [(2, 1), (1, 2), (0, 1), (1, 0)])
def test_placeholder_count_mismatch(proc, n_pads, n_images):
    img = Image.new("RGB", (30, 30))
    with pytest.raises(InputError, match=f"{n_pads} <\\|media_pad\\|> placeholder.*{n_images} image") as e:
        proc(text="x" + "<|media_pad|>" * n_pads, images=[img] * n_images)
    assert "\n" not in str(e.value)


def test_message_image_count_mismatch(proc):
    img = Image.new("RGB", (30, 30))
    two_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(InputError, match="2 image part.*must give 2 image.*got 1"):   # more parts than images
        proc.prepare(two_parts, images=[img])
    with pytest.raises(InputError, match="2 image part.*must give 2 image.*got 3"):   # fewer parts than images
        proc.prepare(two_parts, images=[img] * 3)
    inline = [{"role": "user", "content": [{"type": "image", "image": img}]}]
    with pytest.raises(InputError, match="1 with an inline image, so images= must give 0"):
        proc.prepare(inline, images=[img])
    with pytest.raises(InputError, match="unknown role 'tool'"):
        proc.prepare([{"role": "tool", "content": "x"}])


def test_missing_tiktoken_model(tmp_path):
    shutil.copy(os.path.join(TINY, "config.json"), tmp_path / "config.json")
    with pytest.raises(TokenizerError, match="tiktoken.model: file not found") as e:
        Processor.from_pretrained(str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(TokenizerError, match="tiktoken.model"):
        Processor.from_pretrained(TINY)  # the golden tiny checkpoint ships no vocabulary


def test_config_mismatch(tmp_path):
    write_tiktoken_model(str(tmp_path / "tiktoken.model"), train_bpe("", 256))
    (tmp_path / "config.json").write_text(json.dumps({"media_placeholder_token_id": 300, "vocab_size": 512}))
    with pytest.raises(ConfigError, match="media_placeholder_token_id 300 is not the tokenizer's"):
        Processor.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"media_placeholder_token_id": 277, "vocab_size": 400}))
    with pytest.raises(ConfigError, match="vocab_size 400 is smaller"):
        Processor.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "config.json")  # no config.json: the tokenizer's <|media_pad|> is the placeholder
    p = Processor.from_pretrained(str(tmp_path))
    assert p.media_placeholder_token_id == 277 and p.image_settings.in_token_limit == 4096


def test_custom_template_from_dir(tiny_dir, tmp_path):
    for f in os.listdir(tiny_dir):
        shutil.copy(tiny_dir / f, tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_user|>{{ m['content'] }}{% endfor %}{{ eos_token }}")
    p = Processor.from_pretrained(str(tmp_path))
    assert p.apply_chat_template([{"role": "user", "content": "AB"}]) == "<|im_user|>AB[EOS]"
