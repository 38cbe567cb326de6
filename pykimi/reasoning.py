"""Reasoning kept apart: the text a thinking model writes between ``◁think▷`` and ``◁/think▷``.

Kimi-VL-A3B-Thinking and -Thinking-2506 answer as ``◁think▷ reasoning ◁/think▷ answer``. The markers are plain
text, not special ids: the real tokenizer spells each in a few BPE tokens, a byte-level vocabulary in eleven and twelve
(every character of ``◁`` / ``▷`` is three bytes), so a marker, and even one of its characters, can be split
over several tokens. Everything here works on text; :class:`ReasoningStream` puts the tokenizer's
:class:`~pykimi.tokenizer.StreamDecoder` in front, so callers feed token ids.

The rules, one for the whole text (:func:`split_reasoning`) and the same for a stream (:class:`ReasoningSplitter`,
whose pieces concatenate to exactly what :func:`split_reasoning` returns for the concatenated text):

* the text starts (after optional whitespace) with the start marker: the reasoning is what follows it up to the
  end marker, the answer what follows the end marker. Both lose their surrounding whitespace at the markers
  (reasoning: both ends; answer: its start). No end marker (the model ran out of tokens while thinking): all of
  it is reasoning and the answer is ``""``.
* ``start_in_reasoning=True`` (a prompt that already opened the thinking, as some templates do): the text is
  reasoning up to the end marker without needing the start marker.
* otherwise there is no reasoning: ``reasoning`` is None and the answer is the text unchanged. A marker in the
  middle of an answer is answer text.

Consumers: ``Processor.split_reasoning``, ``pykimi run / chat --reasoning hide|show|raw``, and the server
(``message.reasoning_content`` / ``delta.reasoning_content``, the llama-server / DeepSeek convention, with a
per-request ``reasoning_format`` of 'auto' / 'deepseek' / 'none'): :class:`DeltaStream` turns generated ids into
``{"reasoning_content": ...}`` / ``{"content": ...}`` deltas and :func:`message_fields` a finished text into the
message's fields. :class:`ReasoningBudget` closes the thinking after N tokens by forcing the end marker's ids
(``generate(..., force=budget.force)``; an engine asks ``budget.force(new_ids)`` before each pick).
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_START = "◁think▷"
THINK_END = "◁/think▷"

REASONING = "reasoning"
ANSWER = "answer"


def split_reasoning(text: str, start: str = THINK_START, end: str = THINK_END,
                    start_in_reasoning: bool = False) -> tuple[str | None, str]:
    """A decoded answer -> (reasoning | None, answer); see the module docstring for the rules."""
    if not isinstance(text, str):
        raise TypeError(f"split_reasoning: expected a str, got {type(text).__name__}")
    body = text.lstrip()
    if body.startswith(start):
        body = body[len(start):]
    elif not start_in_reasoning:
        return None, text
    i = body.find(end)
    if i < 0:
        return body.strip(), ""
    return body[:i].strip(), body[i + len(end):].lstrip()


def _held_prefix(buf: str, marker: str) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of ``marker`` (may still become it)."""
    for n in range(min(len(buf), len(marker) - 1), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Streaming :func:`split_reasoning` over text pieces: ``feed(piece) -> [(kind, text), ...]`` with kind
    ``"reasoning"`` or ``"answer"``; ``finish()`` returns what was held back. Text that may still turn out to be
    (part of) a marker, or whitespace that the whole-text rule would strip, is held until it is decided.

    ``state``: ``"start"`` (nothing decided yet), ``"reasoning"``, ``"answer"``; ``reasoning`` is None until
    the stream has entered reasoning, then the reasoning emitted so far; ``answer`` the answer emitted so far;
    ``closed`` is True once the end marker was seen."""

    def __init__(self, start: str = THINK_START, end: str = THINK_END, start_in_reasoning: bool = False):
        if not start or not end:
            raise ValueError("ReasoningSplitter: the markers must be non-empty strings")
        self.start, self.end = start, end
        self.start_in_reasoning = start_in_reasoning
        self.state = "start"            # even when starting in reasoning: an opening marker is still skipped
        self._buf = ""                  # undecided text
        self._lead = True               # still stripping leading whitespace of the current part
        self.reasoning: str | None = "" if start_in_reasoning else None
        self.answer = ""
        self.closed = False

    def _emit(self, out, kind, text):
        if not text:
            return
        if kind == REASONING:
            self.reasoning += text
        else:
            self.answer += text
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))

    def feed(self, piece: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        self._buf += piece
        while True:
            if self.state == "start":
                body = self._buf.lstrip()
                if body.startswith(self.start):
                    self._buf = body[len(self.start):]
                    self.state, self.reasoning, self._lead = REASONING, "", True
                    continue
                if self.start.startswith(body):          # whitespace and / or a prefix of the start marker
                    return out
                if self.start_in_reasoning:              # the prompt opened the thinking: this is reasoning
                    self.state, self._lead = REASONING, True
                    continue
                self.state = ANSWER                      # no reasoning: the text is the answer, unchanged
                self._lead = False
                continue
            if self.state == REASONING:
                if self._lead:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        return out
                    self._lead = False
                i = self._buf.find(self.end)
                if i >= 0:
                    self._emit(out, REASONING, self._buf[:i].rstrip())
                    self._buf = self._buf[i + len(self.end):]
                    self.state, self.closed, self._lead = ANSWER, True, True
                    continue
                # hold back a possible start of the end marker and trailing whitespace (stripped if the marker
                # follows, emitted if more reasoning does)
                keep = _held_prefix(self._buf, self.end)
                ready = self._buf[:len(self._buf) - keep]
                stripped = ready.rstrip()
                self._emit(out, REASONING, stripped)
                self._buf = self._buf[len(stripped):]
                return out
            # answer
            if self._lead:
                self._buf = self._buf.lstrip()
                if not self._buf:
                    return out
                self._lead = False
            self._emit(out, ANSWER, self._buf)
            self._buf = ""
            return out

    def finish(self) -> list[tuple[str, str]]:
        """End of the stream: the held text goes where :func:`split_reasoning` puts it."""
        out: list[tuple[str, str]] = []
        if self.state == "start":
            body = self._buf.lstrip()
            if self.start_in_reasoning:                    # a partial opening marker is reasoning text
                self.state, self._lead = REASONING, True
            else:
                self.state = ANSWER
                self._emit(out, ANSWER, self._buf)
                self._buf = ""
                return out
        if self.state == REASONING:
            self._emit(out, REASONING, self._buf.strip() if self._lead else self._buf.rstrip())
        elif not self._lead:
            self._emit(out, ANSWER, self._buf)
        self._buf = ""
        return out


class ReasoningStream:
    """Token ids in, ``(kind, text)`` pieces out: the tokenizer's stream decoder (never half a character)
    followed by a :class:`ReasoningSplitter`. ``tokens`` counts the ids fed, ``reasoning_tokens`` those fed
    while the stream was not yet past the end marker and had entered (or might still enter) reasoning.

        rs = ReasoningStream(processor.tokenizer)
        for tok in model.generate(..., stream=True):
            for kind, text in rs.add(tok):      # kind: "reasoning" | "answer"
                ...
        rs.flush(); rs.reasoning, rs.answer
    """

    def __init__(self, tokenizer, start: str = THINK_START, end: str = THINK_END,
                 start_in_reasoning: bool = False, skip_special: bool = True):
        self.decoder = tokenizer.stream_decoder(skip_special=skip_special)
        self.splitter = ReasoningSplitter(start, end, start_in_reasoning)
        self.text = ""                                  # everything decoded, markers included (the raw text)
        self.tokens = 0
        self.reasoning_tokens = 0

    def add(self, token_id: int) -> list[tuple[str, str]]:
        self.tokens += 1
        if not self.splitter.closed and self.splitter.state != ANSWER:
            self.reasoning_tokens += 1
        piece = self.decoder.add(int(token_id))
        self.text += piece
        return self.splitter.feed(piece)

    def flush(self) -> list[tuple[str, str]]:
        piece = self.decoder.flush()
        self.text += piece
        return self.splitter.feed(piece) + self.splitter.finish()

    @property
    def state(self) -> str:
        return self.splitter.state

    @property
    def reasoning(self) -> str | None:
        return self.splitter.reasoning

    @property
    def answer(self) -> str:
        return self.splitter.answer


@dataclass
class BudgetRecord:
    """What a :class:`ReasoningBudget` did: the budget, whether it closed the thinking, and at which
    generated token (index into the new ids) the forced end marker began."""
    budget: int
    forced: bool = False
    forced_at: int | None = None
    forced_ids: tuple = ()


class ReasoningBudget:
    """Close the thinking after ``budget`` generated tokens by inserting the end marker.

    ``force(new_ids)`` is called before each token is chosen with the ids generated so far and returns the id
    to emit instead of sampling, or None. Once ``budget`` tokens were generated and the stream is still inside
    the reasoning (it began with the start marker, or ``start_in_reasoning``, and no end marker came), the
    next ids are forced to the tokenization of the end marker, one per step; after that the model answers on
    its own. A model that does not think (no start marker) is never touched. ``pykimi.generate.generate``
    takes it as ``force=budget.force``; any decode loop can do the same."""

    def __init__(self, tokenizer, budget: int, start: str = THINK_START, end: str = THINK_END,
                 start_in_reasoning: bool = False):
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise ValueError(f"reasoning budget {budget!r}: expected an integer >= 0")
        self.budget = budget
        self.end_ids = list(tokenizer.encode(end))
        self.stream = ReasoningStream(tokenizer, start, end, start_in_reasoning)
        self.record = BudgetRecord(budget)
        self._seen = 0
        self._queue: list[int] = []

    def force(self, new_ids) -> int | None:
        for t in list(new_ids)[self._seen:]:
            self.stream.add(t)
        self._seen = len(new_ids)
        if self._queue:
            return self._queue.pop(0)
        sp = self.stream.splitter
        if (not self.record.forced and not sp.closed and sp.state == REASONING
                and len(new_ids) >= self.budget):
            self.record.forced, self.record.forced_at = True, len(new_ids)
            self.record.forced_ids = tuple(self.end_ids)
            self._queue = list(self.end_ids)
            return self._queue.pop(0)
        return None


# ---------------------------------------------------------------------------------------------------------
# OpenAI-style fields (the llama-server / DeepSeek convention), for the server
# ---------------------------------------------------------------------------------------------------------
REASONING_FORMATS = ("auto", "deepseek", "none")


def check_reasoning_format(fmt) -> str:
    """A request's ``reasoning_format``: 'auto' / 'deepseek' (reasoning in ``reasoning_content``) or 'none'
    (the raw text, markers included, in ``content``). None means 'auto'."""
    if fmt is None:
        return "auto"
    if fmt not in REASONING_FORMATS:
        raise ValueError(f"reasoning_format={fmt!r}: expected one of {', '.join(REASONING_FORMATS)}")
    return fmt


def message_fields(text: str, reasoning_format: str | None = "auto", start: str = THINK_START,
                   end: str = THINK_END, start_in_reasoning: bool = False) -> dict:
    """A finished answer -> the assistant message's fields: ``{"content": answer, "reasoning_content":
    reasoning}`` (reasoning_content only when there was reasoning), or ``{"content": text}`` for 'none'."""
    if check_reasoning_format(reasoning_format) == "none":
        return {"content": text}
    reasoning, answer = split_reasoning(text, start, end, start_in_reasoning)
    out = {"content": answer}
    if reasoning is not None:
        out["reasoning_content"] = reasoning
    return out


class DeltaStream:
    """Generated ids in, streaming ``delta`` dicts out: ``{"reasoning_content": "..."}`` / ``{"content": "..."}``
    per piece ('auto' / 'deepseek'), or the raw text as ``content`` ('none'). ``message()`` gives the whole
    message's fields at the end (equal to :func:`message_fields` on the whole text)."""

    def __init__(self, tokenizer, reasoning_format: str | None = "auto", start: str = THINK_START,
                 end: str = THINK_END, start_in_reasoning: bool = False):
        self.format = check_reasoning_format(reasoning_format)
        self.stream = ReasoningStream(tokenizer, start, end, start_in_reasoning)

    def _deltas(self, n0: int, pieces) -> list[dict]:
        if self.format == "none":
            t = self.stream.text[n0:]
            return [{"content": t}] if t else []
        return [{"reasoning_content" if k == REASONING else "content": t} for k, t in pieces]

    def add(self, token_id: int) -> list[dict]:
        n0 = len(self.stream.text)
        return self._deltas(n0, self.stream.add(token_id))

    def flush(self) -> list[dict]:
        n0 = len(self.stream.text)
        return self._deltas(n0, self.stream.flush())

    def message(self) -> dict:
        if self.format == "none":
            return {"content": self.stream.text}
        out = {"content": self.stream.answer}
        if self.stream.reasoning is not None:
            out["reasoning_content"] = self.stream.reasoning
        return out
