"""The Kimi tokenizer (tiktoken byte-level BPE + 256 special ids) and the chat template (spec §4).

* ``tiktoken.model`` holds one ``base64(token bytes) rank`` line per base token, ranks 0..n_base-1.
  The 256 special / reserved ids follow: ``n_base + 0 .. n_base + 255`` (163584..163839 in the release;
  256..511 in the tiny golden checkpoint). Their names come from the directory's
  ``tokenizer_config.json`` (``added_tokens_decoder``) when present, else from the built-in table
  ``data/special_tokens.json`` mapped by offset (real id - 163584 + n_base); any other id is
  ``<|reserved_token_{id}|>``.
* Encoding reproduces HF ``TikTokenTokenizer``: the text is cut into <= 400,000-char pieces and runs of
  more than 25,000 whitespace / non-whitespace chars are split, then each piece goes through tiktoken
  with the Kimi pre-tokenizer pattern. With ``allow_special=True`` special-token strings become single
  ids; they are split off first, as HF's ``tokenizer(text)`` path does (added tokens are cut out before
  ``_tokenize``), so the long-input rule applies to the ordinary text between them.
* Decoding concatenates token bytes and decodes UTF-8 with replacement; ``StreamDecoder`` does the same
  incrementally and never emits half a character.
* The chat template (spec §4) is rendered natively for the built-in Kimi-VL template (tests prove it
  equal to Jinja's rendering of ``data/chat_template.jinja``) and with a sandboxed Jinja environment for
  any other template a checkpoint ships.
"""
from __future__ import annotations

import base64
import binascii
import codecs
import json
import os
import re
from collections import Counter, defaultdict
from typing import Iterable, Iterator

from .errors import InputError, TokenizerError

_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

# Kimi pre-tokenizer (spec §4): eight alternatives joined with '|'. '&&' is class intersection; tiktoken's
# regex engine supports it natively (Python's `regex` needs flags=regex.V1).
KIMI_PAT_ALTERNATIVES = (
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
)
KIMI_PAT = "|".join(KIMI_PAT_ALTERNATIVES)

NUM_SPECIAL = 256                 # reserved ids after the base vocabulary (spec §4)
REAL_N_BASE = 163584              # base tokens of the released tiktoken.model
MAX_ENCODE_CHARS = 400_000        # HF TIKTOKEN_MAX_ENCODE_CHARS (spec §4)
MAX_RUN_CHARS = 25_000            # HF MAX_NO_WHITESPACES_CHARS (spec §4)

BOS, EOS, IM_END, MEDIA_PAD = "[BOS]", "[EOS]", "<|im_end|>", "<|media_pad|>"


# ----------------------------------------------------------------------------------------------------
# tiktoken.model I/O


def load_tiktoken_model(path: str) -> dict[bytes, int]:
    """Read and validate a ``tiktoken.model`` file -> {token bytes: rank}.

    Every problem is a one-line TokenizerError naming the file and line: bad base64, non-integer or
    negative rank, duplicate rank or token, ranks not forming 0..n-1, a single byte with no token.
    """
    if not os.path.isfile(path):
        raise TokenizerError(f"{path}: file not found (the tokenizer vocabulary tiktoken.model is required)")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not a tiktoken.model file (non-ASCII byte at offset {e.start})") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror or e})") from None
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue  # tiktoken's loader skips blank lines too
        fields = line.split()
        if len(fields) != 2:
            raise TokenizerError(f"{path}:{lineno}: expected 'base64-token rank', got {len(fields)} fields")
        b64, rank_s = fields
        try:
            tok = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise TokenizerError(f"{path}:{lineno}: bad base64 token {b64[:40]!r}") from None
        if not tok:
            raise TokenizerError(f"{path}:{lineno}: empty token")
        try:
            rank = int(rank_s)
        except ValueError:
            raise TokenizerError(f"{path}:{lineno}: rank {rank_s[:40]!r} is not an integer") from None
        if rank < 0:
            raise TokenizerError(f"{path}:{lineno}: negative rank {rank}")
        if rank in line_of_rank:
            raise TokenizerError(f"{path}:{lineno}: duplicate rank {rank} (already used on line {line_of_rank[rank]})")
        if tok in ranks:
            raise TokenizerError(f"{path}:{lineno}: duplicate token {tok!r} (already rank {ranks[tok]})")
        ranks[tok] = rank
        line_of_rank[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    n = len(ranks)
    if max(line_of_rank) != n - 1:
        missing = next(r for r in range(n) if r not in line_of_rank)
        raise TokenizerError(f"{path}: ranks must be 0..{n - 1} without gaps; rank {missing} is missing")
    _check_all_bytes(ranks, path)
    return ranks


def _check_all_bytes(ranks: dict[bytes, int], where: str) -> None:
    # byte-level BPE must be able to spell any input; tiktoken panics on a missing single byte
    for b in range(256):
        if bytes([b]) not in ranks:
            raise TokenizerError(f"{where}: no token for the single byte 0x{b:02x} (byte-level BPE needs all 256)")


def write_tiktoken_model(path: str, ranks: dict[bytes, int]) -> None:
    """Write ``ranks`` in the tiktoken.model format (``base64 rank`` per line, by rank; atomic rename)."""
    items = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in items] != list(range(len(items))):
        raise TokenizerError(f"{path}: ranks to write must be 0..{len(items) - 1} without gaps or duplicates")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        for tok, rank in items:
            f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")
    os.replace(tmp, path)


def train_bpe(text: str, vocab_size: int, pat_str: str = KIMI_PAT) -> dict[bytes, int]:
    """A small byte-level BPE trainer -> {token bytes: rank} with ranks 0..vocab_size-1.

    Ranks 0..255 are the single bytes (rank = byte value); each further rank is the most frequent adjacent
    pair inside the pre-tokenizer's pieces (ties -> the smallest pair bytes), so tiktoken's
    lowest-rank-first merging reproduces the training merges. Stops early when no pair is left.
    """
    import regex  # a tiktoken dependency; V1 for the '&&' class intersection (spec §4 pitfall)

    if vocab_size < 256:
        raise TokenizerError(f"train_bpe: vocab_size must be >= 256 (all single bytes), got {vocab_size}")
    ranks = {bytes([b]): b for b in range(256)}
    words: list[list[bytes]] = []
    freqs: list[int] = []
    for piece, c in Counter(regex.findall(pat_str, text, flags=regex.V1)).items():
        words.append([bytes([b]) for b in piece.encode("utf-8")])
        freqs.append(c)
    pair_count: Counter = Counter()
    where: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)  # pair -> indices of words holding it
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freqs[i]
            where[p].add(i)
    while len(ranks) < vocab_size:
        top = max(pair_count.values(), default=0)
        if top <= 0:
            break
        best = min(p for p, c in pair_count.items() if c == top)  # ties -> smallest pair (deterministic)
        merged = best[0] + best[1]
        for i in list(where.pop(best, ())):
            w, f = words[i], freqs[i]
            for p in zip(w, w[1:]):  # retract this word's pairs, merge, re-add
                pair_count[p] -= f
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == best[0] and w[j + 1] == best[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for p in zip(out, out[1:]):
                pair_count[p] += f
                where[p].add(i)
        pair_count.pop(best, None)
        if merged not in ranks:
            ranks[merged] = len(ranks)
    return ranks


# ----------------------------------------------------------------------------------------------------
# special tokens


def builtin_special_names(n_base: int) -> dict[int, str]:
    """id -> name for the 256 special ids after ``n_base`` base tokens, from data/special_tokens.json
    (real id - 163584 + n_base); unnamed ids are ``<|reserved_token_{id}|>``."""
    with open(os.path.join(_DATA, "special_tokens.json"), encoding="utf-8") as f:
        table = json.load(f)
    real_base = int(table.get("num_base_bpe_tokens", REAL_N_BASE))
    named = {int(k) - real_base + n_base: v for k, v in table["special"].items()}
    return {i: named.get(i, f"<|reserved_token_{i}|>") for i in range(n_base, n_base + NUM_SPECIAL)}


def special_names_from_config(cfg: dict, n_base: int, where: str) -> dict[int, str]:
    """id -> name from a tokenizer_config.json ``added_tokens_decoder`` (ids as written, HF semantics)."""
    dec = cfg.get("added_tokens_decoder")
    if dec is None:
        return builtin_special_names(n_base)
    if not isinstance(dec, dict):
        raise TokenizerError(f"{where}: added_tokens_decoder must be an object id -> token")
    names = {}
    for k, v in dec.items():
        try:
            i = int(k)
        except ValueError:
            raise TokenizerError(f"{where}: added_tokens_decoder key {k!r} is not an integer id") from None
        content = v.get("content") if isinstance(v, dict) else v
        if not isinstance(content, str) or not content:
            raise TokenizerError(f"{where}: added_tokens_decoder[{k}] has no 'content' string")
        if not n_base <= i < n_base + NUM_SPECIAL:
            raise TokenizerError(f"{where}: added token id {i} ({content}) is outside the special range "
                                 f"[{n_base}, {n_base + NUM_SPECIAL}) of this {n_base}-token vocabulary")
        names[i] = content
    return {i: names.get(i, f"<|reserved_token_{i}|>") for i in range(n_base, n_base + NUM_SPECIAL)}


def _token_name(v) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


# ----------------------------------------------------------------------------------------------------
# long-input splitting (spec §4, HF TikTokenTokenizer.encode)


_RUN_RE = re.compile(r"\s+|\S+")  # `re`'s \s on str is exactly str.isspace()


def split_long_input(text: str, max_chars: int = MAX_ENCODE_CHARS, max_run: int = MAX_RUN_CHARS) -> Iterator[str]:
    """The pieces HF encodes separately: <= max_chars-char chunks, each cut inside runs of more than
    ``max_run`` consecutive whitespace (or non-whitespace) chars every ``max_run`` chars of the run."""
    for start in range(0, max(len(text), 1), max_chars):
        chunk = text[start:start + max_chars]
        if len(chunk) <= max_run:
            yield chunk
            continue
        cut = 0
        for m in _RUN_RE.finditer(chunk):
            a, b = m.span()
            for c in range(a + max_run, b, max_run):  # the run's (max_run+1)-th char starts a new piece
                yield chunk[cut:c]
                cut = c
        yield chunk[cut:]


# ----------------------------------------------------------------------------------------------------
# the tokenizer


class Tokenizer:
    """tiktoken BPE with the Kimi pattern and 256 special ids (spec §4).

    ``Tokenizer(ranks, special_names)`` builds from memory; ``Tokenizer.from_pretrained(dir)`` reads
    ``tiktoken.model`` (+ optional ``tokenizer_config.json``) from a checkpoint directory.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], special_names: dict[int, str] | None = None, *,
                 bos_token: str = BOS, eos_token: str = EOS, name: str = "kimi", source: str = "<memory>"):
        import tiktoken

        n_base = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n_base)):
            raise TokenizerError(f"{source}: ranks must be 0..{n_base - 1} without gaps or duplicates")
        _check_all_bytes(mergeable_ranks, source)
        if special_names is None:
            special_names = builtin_special_names(n_base)
        self.n_base = n_base
        self.source = source
        specials: dict[str, int] = {}
        for i in range(n_base, n_base + NUM_SPECIAL):
            nm = special_names.get(i, f"<|reserved_token_{i}|>")
            if nm in specials:
                raise TokenizerError(f"{source}: special token {nm!r} is used for ids {specials[nm]} and {i}")
            specials[nm] = i
        self._special_ids = specials                          # name -> id, all 256
        self._special_names = {i: s for s, i in specials.items()}
        self._enc = tiktoken.Encoding(name, pat_str=KIMI_PAT, mergeable_ranks=mergeable_ranks,
                                      special_tokens=specials)
        alts = sorted(specials, key=len, reverse=True)        # longest first: no name shadows a longer one
        self._special_re = re.compile("|".join(re.escape(s) for s in alts))

        def need(tok: str) -> int:
            if tok not in specials:
                raise TokenizerError(f"{source}: special token {tok!r} is not among the 256 special ids")
            return specials[tok]
        self.bos_id = need(bos_token)
        self.eos_id = need(eos_token)
        self.im_end_id = need(IM_END)
        # the language model alone (Moonlight) has no media tokens: no image placeholder then
        self.media_pad_id = specials.get(MEDIA_PAD)

    # -- construction

    @classmethod
    def from_pretrained(cls, path: str) -> "Tokenizer":
        """Load from a checkpoint directory (or a tiktoken.model path): names from tokenizer_config.json
        when the directory has one, else the built-in table."""
        if os.path.isdir(path):
            d, model = path, os.path.join(path, "tiktoken.model")
        else:
            d, model = os.path.dirname(path) or ".", path
        ranks = load_tiktoken_model(model)
        cfg_path = os.path.join(d, "tokenizer_config.json")
        cfg = read_tokenizer_config(cfg_path)
        bos, eos = BOS, EOS
        if cfg is None:
            names = builtin_special_names(len(ranks))
        else:
            names = special_names_from_config(cfg, len(ranks), cfg_path)
            bos = _token_name(cfg.get("bos_token")) or BOS
            eos = _token_name(cfg.get("eos_token")) or EOS
        return cls(ranks, names, bos_token=bos, eos_token=eos, source=model)

    # -- properties

    @property
    def n_vocab(self) -> int:
        return self.n_base + NUM_SPECIAL

    @property
    def special_ids(self) -> dict[str, int]:
        """name -> id for all 256 special / reserved ids."""
        return dict(self._special_ids)

    @property
    def stop_ids(self) -> list[int]:
        """[EOS] and <|im_end|>: assistant turns end with <|im_end|>, the config eos is [EOS] (spec §4)."""
        return [self.eos_id, self.im_end_id]

    @property
    def mergeable_ranks(self) -> dict[bytes, int]:
        return self._enc._mergeable_ranks

    def token_to_id(self, token: str) -> int:
        """The id of a special token name, or of a string that is exactly one base token."""
        if token in self._special_ids:
            return self._special_ids[token]
        r = self._enc._mergeable_ranks.get(token.encode("utf-8"))
        if r is None:
            raise InputError(f"token {token!r} is neither a special token nor a single base token")
        return r

    def is_special(self, token_id: int) -> bool:
        return self.n_base <= int(token_id) < self.n_vocab

    def token_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(self._check_ids([token_id])[0])

    # -- encode

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """text -> ids. No BOS/EOS is added (spec §4). With ``allow_special`` special-token strings become
        single ids; otherwise they are encoded as the plain text they are."""
        if not isinstance(text, str):
            raise InputError(f"encode: expected a str, got {type(text).__name__}")
        if not allow_special:
            return self._encode_plain(text)
        ids: list[int] = []
        pos = 0
        for m in self._special_re.finditer(text):
            ids += self._encode_plain(text[pos:m.start()])
            ids.append(self._special_ids[m.group()])
            pos = m.end()
        ids += self._encode_plain(text[pos:])
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        ids: list[int] = []
        for piece in split_long_input(text):
            ids += self._enc.encode_ordinary(piece)
        return ids

    # -- decode

    def _check_ids(self, ids) -> list[int]:
        out = []
        for t in ids:
            try:
                i = int(t)
            except (TypeError, ValueError):
                i = None
            if i is None or i != t:
                raise InputError(f"decode: token id {t!r} is not an integer")
            if not 0 <= i < self.n_vocab:
                raise InputError(f"decode: token id {t!r} is outside the vocabulary [0, {self.n_vocab})")
            out.append(i)
        return out

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        ids = self._check_ids(ids)
        if skip_special:
            ids = [i for i in ids if i < self.n_base]
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """ids -> text: concatenated token bytes decoded as UTF-8, invalid bytes -> U+FFFD (spec §4)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def __repr__(self) -> str:
        return f"Tokenizer(n_base={self.n_base}, n_vocab={self.n_vocab}, source={self.source!r})"


class StreamDecoder:
    """Incremental detokenizer for streaming: ``add(id) -> str`` returns only complete characters; the
    bytes of a character split across tokens wait for the rest. ``flush()`` ends the stream (a dangling
    partial character becomes U+FFFD). The concatenated outputs equal ``tokenizer.decode(all ids)``."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._dec.decode(self.tokenizer.decode_bytes([token_id], self.skip_special))

    def add_many(self, ids: Iterable[int]) -> str:
        return self._dec.decode(self.tokenizer.decode_bytes(ids, self.skip_special))

    __call__ = add

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)

    @property
    def pending(self) -> bytes:
        """Bytes held back because they are the start of an unfinished character."""
        return self._dec.getstate()[0]


def read_tokenizer_config(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return cfg


# ----------------------------------------------------------------------------------------------------
# chat template (spec §4)


ROLES = ("system", "user", "assistant")
DEFAULT_SYSTEM = "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
MEDIA_BLOCK = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
GENERATION_PROMPT = "<|im_assistant|>assistant<|im_middle|>"


def builtin_chat_template() -> str:
    """The Kimi-VL template text (data/chat_template.jinja, verbatim from the release)."""
    with open(os.path.join(_DATA, "chat_template.jinja"), encoding="utf-8") as f:
        return f.read()


def is_image_part(part: dict) -> bool:
    # the template's test, verbatim: type == 'image' or an 'image' / 'image_url' key
    return part.get("type") == "image" or "image" in part or "image_url" in part


def check_messages(messages) -> None:
    """One-line InputError for anything the template cannot render: not a list of {role, content}, an
    unknown role, content neither a str nor a list of parts, a text part without a 'text' string."""
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"messages[{i}]: unknown role {m['role']!r} (expected system, user or assistant)")
        c = m["content"]
        if isinstance(c, str):
            continue
        if not isinstance(c, (list, tuple)):
            raise InputError(f"messages[{i}].content must be a str or a list of parts, got {type(c).__name__}")
        for j, part in enumerate(c):
            if not isinstance(part, dict):
                raise InputError(f"messages[{i}].content[{j}] must be a dict part, got {type(part).__name__}")
            if not is_image_part(part) and not isinstance(part.get("text"), str):
                raise InputError(f"messages[{i}].content[{j}]: a text part needs a 'text' string")


def render_kimi_chat(messages, add_generation_prompt: bool = True) -> str:
    """Native rendering of the Kimi-VL template (spec §4): a default system turn when the first message
    is not system, <|im_{role}|>role<|im_middle|>content<|im_end|> per message, image parts as the media
    block, no separators or newlines anywhere, then the generation prompt."""
    check_messages(messages)
    out = []
    for i, m in enumerate(messages):
        if i == 0 and m["role"] != "system":
            out.append(DEFAULT_SYSTEM)
        out.append(f"<|im_{m['role']}|>{m['role']}<|im_middle|>")
        c = m["content"]
        if isinstance(c, str):
            out.append(c)
        else:
            out.extend(MEDIA_BLOCK if is_image_part(p) else p["text"] for p in c)
        out.append("<|im_end|>")
    if add_generation_prompt:
        out.append(GENERATION_PROMPT)
    return "".join(out)


def _jinja_env():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise InputError(f"chat template: {msg}")

    # the environment HF uses for chat templates
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols],
                                        undefined=jinja2.Undefined)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env


class ChatTemplate:
    """A chat template: the built-in Kimi-VL one (rendered natively) or a checkpoint's Jinja text."""

    def __init__(self, source: str | None = None, origin: str = "built-in", **extra_context):
        self.source = builtin_chat_template() if source is None else source
        self.origin = origin
        self.native = self.source.strip() == builtin_chat_template().strip()
        self.extra_context = extra_context
        self._compiled = None
        if not self.native:
            import jinja2
            try:
                self._compiled = _jinja_env().from_string(self.source)
            except jinja2.TemplateError as e:
                raise TokenizerError(f"{origin}: chat template does not compile ({e})") from None

    @classmethod
    def from_dir(cls, d: str, **extra_context) -> "ChatTemplate":
        """chat_template.jinja, else chat_template.json, else tokenizer_config.json's chat_template,
        else the built-in template."""
        p = os.path.join(d, "chat_template.jinja")
        if os.path.isfile(p):
            with open(p, encoding="utf-8") as f:
                return cls(f.read(), p, **extra_context)
        for name in ("chat_template.json", "tokenizer_config.json"):
            p = os.path.join(d, name)
            cfg = read_tokenizer_config(p)
            if cfg is None or cfg.get("chat_template") is None:
                continue
            t = cfg["chat_template"]
            if isinstance(t, list):  # HF's named-template list
                named = {e.get("name"): e.get("template") for e in t if isinstance(e, dict)}
                t = named.get("default")
            if not isinstance(t, str):
                raise TokenizerError(f"{p}: chat_template must be a string (or a list with a 'default' entry)")
            return cls(t, p, **extra_context)
        return cls(None, "built-in", **extra_context)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        if self.native:
            return render_kimi_chat(messages, add_generation_prompt)
        check_messages(messages)
        import jinja2
        try:
            return self._compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                         **self.extra_context)
        except jinja2.TemplateError as e:
            raise InputError(f"{self.origin}: chat template failed on these messages ({e})") from None
