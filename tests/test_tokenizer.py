"""Tokenizer (spec §4) on a synthetic vocabulary trained here, in the real tiktoken.model format."""
import base64
import json
import os
import random

import pytest
import regex
import tiktoken

from pykimi.errors import InputError, TokenizerError
from pykimi.tokenizer import (KIMI_PAT, MAX_RUN_CHARS, NUM_SPECIAL, StreamDecoder, Tokenizer, builtin_special_names,
                              load_tiktoken_model, split_long_input, train_bpe, write_tiktoken_model)

CORPUS = """The quick brown fox jumps over the lazy dog. It's what they'd've said, isn't it? We'll see.
Machine learning models read text as tokens; a tokenizer maps strings to integer ids and back again.
Prices rose 12.5% in 2024 (from $1,299 to $1,461) -- see https://example.com/report?id=42&lang=en.
你好世界！今天天气很好，我们一起去公园散步吧。机器学习和人工智能正在改变世界。这是一个中文句子。
日本語のテキストも少し入れます。カタカナとひらがな。 Привет, как дела? Ça va très bien, merci. Größe
def tokenize(text: str) -> list[int]:
    ids = []
    for i, ch in enumerate(text):
        if ch.isspace():
            continue  # skip whitespace
        ids.append(ord(ch) % 256)
    return ids

class Vision(nn.Module):
    def forward(self, x):  # [B, 3, 14, 14]
        return self.proj(x).flatten(1)
emoji: 🙂 🎉 👍🏽 👨‍👩‍👧 🇫🇷 and math: ∑ x² ≤ ∞, arrows → ← ↔.
	Tabs	and   multiple   spaces,
trailing spaces   
Windows line\r\nendings\r\n and a long ======================= rule.
"""


@pytest.fixture(scope="module")
def ranks():
    r = train_bpe(CORPUS * 3, 700)
    assert 400 < len(r) <= 700 and all(r[bytes([b])] == b for b in range(256))
    return r


@pytest.fixture(scope="module")
def tokdir(ranks, tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tiktoken_model(str(d / "tiktoken.model"), ranks)
    return d


@pytest.fixture(scope="module")
def tok(tokdir):
    return Tokenizer.from_pretrained(str(tokdir))


# ---------------------------------------------------------------------------- file format


def test_file_format_and_roundtrip(ranks, tokdir):
    lines = (tokdir / "tiktoken.model").read_text("ascii").splitlines()
    assert len(lines) == len(ranks)
    for i, line in enumerate(lines):  # "base64 rank", in rank order
        b64, r = line.split(" ")
        assert int(r) == i and ranks[base64.b64decode(b64)] == i
    assert load_tiktoken_model(str(tokdir / "tiktoken.model")) == ranks


def test_vocab_layout_and_special_ids(tok, ranks):
    n = len(ranks)
    assert tok.n_base == n and tok.n_vocab == n + NUM_SPECIAL
    sp = tok.special_ids
    assert len(sp) == NUM_SPECIAL and sorted(sp.values()) == list(range(n, n + NUM_SPECIAL))
    # built-in table by offset from 163584 (spec §4)
    assert (tok.bos_id, tok.eos_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert sp["<|im_user|>"] == n + 3 and sp["<|im_assistant|>"] == n + 4 and sp["<|im_system|>"] == n + 10
    assert sp["<|im_middle|>"] == n + 17 and sp["<|media_start|>"] == n + 18 and sp["<|media_end|>"] == n + 20
    assert tok.media_pad_id == sp["<|media_pad|>"] == n + 21
    assert sp["[UNK]"] == n + 254 and sp["[PAD]"] == n + 255
    assert sp[f"<|reserved_token_{n + 5}|>"] == n + 5
    assert tok.stop_ids == [n + 1, n + 2]


def test_tiny_layout_256_base():
    # the golden tiny checkpoint: 256 base tokens -> <|media_pad|> = 277 (tests/golden/README.md)
    with open(os.path.join(os.path.dirname(__file__), "golden", "one_image", "inputs.json")) as f:
        expected = json.load(f)["special_ids"]
    names = builtin_special_names(256)
    tk = Tokenizer({bytes([b]): b for b in range(256)}, names)
    assert tk.n_vocab == 512
    for name, i in expected.items():
        assert tk.special_ids[name] == i
    assert tk.media_pad_id == 277 and tk.stop_ids == [257, 258]


def test_tokenizer_config_names_win(ranks, tmp_path):
    write_tiktoken_model(str(tmp_path / "tiktoken.model"), ranks)
    n = len(ranks)
    dec = {str(n + i): {"content": name, "special": True} for i, name in
           [(0, "<s>"), (1, "</s>"), (2, "<|im_end|>"), (21, "<|media_pad|>"), (7, "<|custom|>")]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": dec, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tk = Tokenizer.from_pretrained(str(tmp_path))
    assert tk.bos_id == n and tk.eos_id == n + 1 and tk.special_ids["<|custom|>"] == n + 7
    assert "[BOS]" not in tk.special_ids and tk.special_ids[f"<|reserved_token_{n + 3}|>"] == n + 3
    assert tk.encode("a<|custom|>b", allow_special=True)[1] == n + 7


# ---------------------------------------------------------------------------- pre-tokenizer (spec §4)

SPLITS = [
    ("Hello World's 你好世界 12345", ["Hello", " World's", " ", "你好世界", " ", "123", "45"]),
    ("I'M here", ["I'M", " here"]),
    ("don't", ["don't"]),
    ("   leading", ["  ", " leading"]),
    ("line1\r\nline2\n\n", ["line", "1", "\r\n", "line", "2", "\n\n"]),
    ("x+=1;  // ok", ["x", "+=", "1", ";", " ", " //", " ok"]),
    ("12345678", ["123", "456", "78"]),
    ("ÉCOLE école", ["ÉCOLE", " école"]),
    ("日本語のテキスト", ["日本語", "のテキスト"]),
    ("hello世界", ["hello", "世界"]),
    ('He said: "Hi!"', ["He", " said", ":", ' "', "Hi", '!"']),
    ("tab\there", ["tab", "\there"]),
    ("hi 🙂🙂!", ["hi", " 🙂🙂!"]),
    ("a\n\n  b", ["a", "\n\n", " ", " b"]),
]


@pytest.mark.parametrize("text,expected", SPLITS)
def test_pretokenizer_regex_v1(text, expected):
    # independent check of the pattern with the `regex` module in V1 mode ('&&' = intersection)
    assert regex.findall(KIMI_PAT, text, flags=regex.V1) == expected


def test_v0_mode_would_be_wrong():
    # the spec's pitfall: without V1 the letters of "Hello World's" are lost
    assert regex.findall(KIMI_PAT, "Hello World's") != ["Hello", " World's"]


@pytest.mark.parametrize("text,expected", SPLITS)
def test_tiktoken_splits_like_the_spec(text, expected):
    # train a vocabulary on the string alone until every piece is one token; BPE never merges across
    # pieces, so the tokens tiktoken produces are exactly its pre-tokenizer's pieces
    tk = Tokenizer(train_bpe(text, 256 + 200))
    assert [tk.decode([i]) for i in tk.encode(text)] == expected


# ---------------------------------------------------------------------------- round trips

ROUNDTRIP = [
    "",
    "Hello, world!",
    "你好世界，机器学习。",
    "Mixed 中文 and English, numbers 3.14159 and 1,000,000.",
    "emoji 🙂🎉 👍🏽 family 👨‍👩‍👧 flag 🇫🇷 keycap 1️⃣",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n",
    "    indented\n        more\n\n\n   \t \r\n",
    "Ωμέγα Привет עברית العربية हिन्दी ภาษาไทย",
    "\x00\x01 control \x7f and \u200b zero width \ufeff",
    "lone surrogate-free but rare: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 \U0010ffff",
    "a" * 1000 + " " * 1000 + "b",
]


@pytest.mark.parametrize("text", ROUNDTRIP)
def test_roundtrip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_base for i in ids)
    assert tok.decode(ids) == text


def test_roundtrip_random_unicode(tok):
    rng = random.Random(0)
    pool = [chr(c) for c in list(range(32, 127)) + list(range(0x4E00, 0x4E40)) + [0x1F600, 0x1F44D, 0x3000, 0xA0,
                                                                                  0x2028, 0x85, 10, 13, 9]]
    for _ in range(200):
        s = "".join(rng.choice(pool) for _ in range(rng.randint(0, 60)))
        assert tok.decode(tok.encode(s)) == s


def test_merges_are_used(tok):
    # the trained vocabulary compresses its own corpus well below one token per byte
    assert len(tok.encode(CORPUS)) < 0.6 * len(CORPUS.encode("utf-8"))


# ---------------------------------------------------------------------------- special tokens in text


def test_special_tokens_in_text(tok):
    text = "<|im_user|>user<|im_middle|>hi<|media_pad|><|im_end|>"
    ids = tok.encode(text, allow_special=True)
    sp = tok.special_ids
    assert ids[0] == sp["<|im_user|>"] and ids[-1] == tok.im_end_id
    assert sum(1 for i in ids if i >= tok.n_base) == 4 and tok.media_pad_id in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "userhi"
    plain = tok.encode(text)  # default: special strings are ordinary text
    assert all(i < tok.n_base for i in plain) and tok.decode(plain) == text
    assert tok.encode("<|reserved_token_999999|>", allow_special=True) == tok.encode("<|reserved_token_999999|>")


def test_decode_bad_ids(tok):
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([tok.n_vocab])
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(InputError, match="not an integer"):
        tok.decode(["a"])
    with pytest.raises(InputError, match="expected a str"):
        tok.encode(b"bytes")


# ---------------------------------------------------------------------------- streaming decode


def test_stream_split_multibyte(tok):
    # '你' is e4 bd a0 and '🙂' f0 9f 99 82: feeding them byte by byte emits nothing until complete
    d = tok.stream_decoder()
    assert [d.add(b) for b in "你".encode()] == ["", "", "你"]
    assert [d.add(b) for b in "🙂".encode()] == ["", "", "", "🙂"]
    assert d.add(tok.im_end_id) == "<|im_end|>" and d.flush() == ""
    d = tok.stream_decoder()
    assert d.add(0xF0) == "" and d.pending == b"\xf0"
    assert d.flush() == "\ufffd"  # a dangling partial char ends as one replacement


def test_stream_equals_decode(tok):
    text = "emoji 🙂🎉👍🏽 中文字符 Привет 𝔘𝔫𝔦 " * 3
    ids = tok.encode(text)
    d = StreamDecoder(tok)
    pieces = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    rng = random.Random(1)
    for _ in range(300):  # arbitrary ids, invalid UTF-8 included: same text as a full decode
        ids = [rng.randrange(tok.n_vocab) for _ in range(rng.randint(0, 12))]
        d = tok.stream_decoder()
        assert "".join(d.add(i) for i in ids) + d.flush() == tok.decode(ids)


# ---------------------------------------------------------------------------- long inputs (spec §4)


def _hf_split(s, max_run):
    # the HF rule, character by character: a run of > max_run whitespace (or non-whitespace) chars
    # is cut every max_run chars
    out, start, run, is_space = [], 0, 0, s[0].isspace() if s else False
    for i, ch in enumerate(s):
        if ch.isspace() != is_space:
            is_space, run = ch.isspace(), 1
        else:
            run += 1
            if run > max_run:
                out.append(s[start:i])
                start, run = i, 1
    out.append(s[start:])
    return out


def test_split_long_input_matches_char_rule():
    rng = random.Random(2)
    chars = ["a", "b", "中", " ", "\n", "\u3000", "\x1c", "\x85", "\xa0", "\u2028", "\t"]
    for _ in range(200):
        s = "".join(rng.choice(chars) * rng.randint(1, 30) for _ in range(rng.randint(0, 20)))
        m = rng.randint(1, 12)
        assert list(split_long_input(s, 10 ** 9, m)) == _hf_split(s, m)
    s = "x" * 60000 + " " * 26000 + "y"
    pieces = list(split_long_input(s))
    assert pieces == _hf_split(s, MAX_RUN_CHARS) and [len(p) for p in pieces] == [25000, 25000, 35000, 1001]
    # 400k-char chunks first, then the run rule inside each chunk
    s = ("ab " * 150000)[:450000]
    assert list(split_long_input(s)) == [s[:400000], s[400000:]]


def test_long_input_encode(tok, ranks):
    # reference: an independent tiktoken Encoding fed the HF pieces one by one
    enc = tiktoken.Encoding("ref", pat_str=KIMI_PAT, mergeable_ranks=ranks, special_tokens={})
    text = "word " * 10 + "ab" * 20000 + " " * 30000 + "中" * 26000 + "tail" + ("x y" * 140000)
    assert len(text) > 400000
    expected = []
    for i in range(0, len(text), 400000):
        for piece in _hf_split(text[i:i + 400000], MAX_RUN_CHARS):
            expected += enc.encode_ordinary(piece)
    ids = tok.encode(text)
    assert ids == expected
    assert tok.decode(ids) == text


# ---------------------------------------------------------------------------- bad files


def _write(tmp_path, lines):
    p = tmp_path / "tiktoken.model"
    p.write_text("".join(line + "\n" for line in lines))
    return p


def _bytes_lines():
    return [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]


def _one_line(e):
    return "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="tiktoken.model: file not found") as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert _one_line(e)


@pytest.mark.parametrize("bad,msg", [
    ("!!notbase64!! 256", r"tiktoken.model:257: bad base64"),
    ("YWI= 25x", r"tiktoken.model:257: rank '25x' is not an integer"),
    ("YWI= 17", r"tiktoken.model:257: duplicate rank 17 \(already used on line 18\)"),
    ("YWI=", r"tiktoken.model:257: expected 'base64-token rank'"),
    ("YWI= -3", r"tiktoken.model:257: negative rank"),
    ("YQ== 256", r"tiktoken.model:257: duplicate token"),
    ("YWI= 300", r"rank 256 is missing"),
])
def test_malformed_file(tmp_path, bad, msg):
    p = _write(tmp_path, _bytes_lines() + [bad])
    with pytest.raises(TokenizerError, match=msg) as e:
        Tokenizer.from_pretrained(str(tmp_path))
    assert _one_line(e) and str(p) in str(e.value)


def test_missing_single_byte(tmp_path):
    lines = _bytes_lines()
    lines[65] = f"{base64.b64encode(b'xy').decode()} 65"  # no token for 'A'
    _write(tmp_path, lines)
    with pytest.raises(TokenizerError, match="single byte 0x41"):
        Tokenizer.from_pretrained(str(tmp_path))


def test_bad_tokenizer_config(ranks, tmp_path):
    write_tiktoken_model(str(tmp_path / "tiktoken.model"), ranks)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_pretrained(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "<x>"}}}))
    with pytest.raises(TokenizerError, match="outside the special range"):
        Tokenizer.from_pretrained(str(tmp_path))
