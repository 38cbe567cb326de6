"""Reasoning kept apart: the whole-text split, the streaming splitter (pieces, single characters, token ids with
markers and characters split across tokens), the budget, the CLI modes, and what the chat template does with
earlier turns' reasoning."""
import io
import json
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cli_helpers import make_tiny_model_dir
from pykimi.reasoning import (THINK_END, THINK_START, ReasoningBudget, ReasoningSplitter,
                              split_reasoning)

S, E = THINK_START, THINK_END


# ------------------------------------------------------------------------------------------ whole text
@pytest.mark.parametrize("text, want", [
    ("Two shapes.", (None, "Two shapes.")),                                  # no markers at all
    ("  Two shapes. ", (None, "  Two shapes. ")),                            # unchanged, whitespace too
    (f"{S}count them{E}Two.", ("count them", "Two.")),
    (f"\n {S}\n count them \n{E}\n\nTwo. ", ("count them", "Two. ")),       # stripped at the markers only
    (f"{S}still thinking when the tokens ran out", ("still thinking when the tokens ran out", "")),  # no end
    (f"{S}{E}Two.", ("", "Two.")),                                           # empty reasoning
    (f"Sure. {S}x{E}y", (None, f"Sure. {S}x{E}y")),                          # a marker mid-answer is answer text
    (f"{S}a{E}b{E}c", ("a", f"b{E}c")),                                      # the first end marker closes
    ("", (None, "")),
])
def test_split_whole(text, want):
    assert split_reasoning(text) == want


def test_split_start_in_reasoning():
    # a prompt that already opened the thinking: no start marker needed
    assert split_reasoning(f"count {E} Two.", start_in_reasoning=True) == ("count", "Two.")
    assert split_reasoning("count", start_in_reasoning=True) == ("count", "")
    assert split_reasoning(f"{S}count{E}Two.", start_in_reasoning=True) == ("count", "Two.")
    assert split_reasoning(f"count {E} Two.") == (None, f"count {E} Two.")


def _stream(pieces, **kw):
    sp = ReasoningSplitter(**kw)
    out = []
    for p in pieces:
        out += sp.feed(p)
    out += sp.finish()
    r = "".join(t for k, t in out if k == "reasoning")
    a = "".join(t for k, t in out if k == "answer")
    assert r == (sp.reasoning or "") and a == sp.answer, "emitted pieces != the splitter's running totals"
    return (sp.reasoning, a), out


ATOMS = [S, E, S[:3], E[:4], E[2:], " ", "\n", "  ", "Two", " shapes", ".", "◁", "▷", "think", "/", "x y"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(ATOMS), max_size=12), st.data(), st.booleans())
def test_stream_equals_whole(atoms, data, start_in):
    text = "".join(atoms)
    want = split_reasoning(text, start_in_reasoning=start_in)
    # arbitrary cut points, and one character at a time
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=8)))
    pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
    for p in (pieces, list(text)):
        got, out = _stream(p, start_in_reasoning=start_in)
        assert got == want, f"text {text!r} pieces {p!r}: stream {got!r} != whole {want!r}"
        assert all(k in ("reasoning", "answer") and t for k, t in out)


def test_stream_order_and_holdback():
    sp = ReasoningSplitter()
    assert sp.feed("◁thi") == [] and sp.state == "start"             # a prefix of the start marker: undecided
    assert sp.feed("nk▷ Let me") == [("reasoning", "Let me")] and sp.state == "reasoning"
    assert sp.feed(" see ◁/th") == [("reasoning", " see")]           # the end marker's prefix and the space wait
    assert sp.feed("ink▷ Two") == [("answer", "Two")] and sp.closed
    assert sp.feed(" shapes") == [("answer", " shapes")]
    assert sp.finish() == []
    assert (sp.reasoning, sp.answer) == ("Let me see", "Two shapes")
    sp = ReasoningSplitter()
    assert sp.feed("◁th") == [] and sp.finish() == [("answer", "◁th")]  # never became a marker: answer text


# ------------------------------------------------------------------------------------------ token ids
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_model_dir(str(tmp_path_factory.mktemp("reason") / "tiny"))


@pytest.fixture(scope="module")
def proc(tiny_dir):
    from pykimi import Processor
    return Processor.from_pretrained(tiny_dir)


def test_token_stream_markers_split_across_tokens(proc):
    tok = proc.tokenizer
    text = f"{S}three circles, one red{E}Three shapes: ◁ a red circle ▷."
    ids = tok.encode(text)
    # the byte vocabulary spells every character of ◁ / ▷ in three tokens: the end marker spans 12 tokens
    assert len(tok.encode(E)) == len(E.encode()) == 12
    rs = proc.reasoning_stream()
    seen = []
    for i in ids:
        for kind, t in rs.add(i):
            seen.append(kind)
            assert "\ufffd" not in t, "half a character was emitted"
    rs.flush()
    assert (rs.reasoning, rs.answer) == proc.split_reasoning(text) == ("three circles, one red",
                                                                      "Three shapes: ◁ a red circle ▷.")
    assert seen == sorted(seen, key=lambda k: k != "reasoning"), "reasoning must all come before the answer"
    assert rs.text == text and rs.tokens == len(ids)
    assert rs.reasoning_tokens == len(tok.encode(S + "three circles, one red" + E))


def test_token_stream_missing_end_and_no_markers(proc):
    tok = proc.tokenizer
    for text, want in ((f"{S}thinking forever", ("thinking forever", "")), ("plain answer", (None, "plain answer"))):
        rs = proc.reasoning_stream()
        for i in tok.encode(text):
            rs.add(i)
        rs.flush()
        assert (rs.reasoning, rs.answer) == want
    assert proc.split_reasoning("plain") == (None, "plain")


# ------------------------------------------------------------------------------------------ budget
@pytest.fixture(scope="module")
def model(tiny_dir):
    import pykimi
    return pykimi.load(tiny_dir)


def _prompt(proc, text="hello"):
    return proc.prepare([{"role": "user", "content": text}])["input_ids"]


class PrefixThenBudget:
    """Forces the ids of ``prefix`` first (as a thinking model opens with ◁think▷), then asks the budget."""

    def __init__(self, prefix_ids, budget):
        self.prefix, self.budget = list(prefix_ids), budget

    def force(self, new):
        b = self.budget.force(new)          # the budget sees every id, forced or not
        if len(new) < len(self.prefix):
            return self.prefix[len(new)]
        return b


def test_budget_closes_thinking_and_decoding_continues(model, proc):
    from pykimi.generate import generate

    tok = proc.tokenizer
    ids = _prompt(proc)
    start_ids, end_ids = tok.encode(S), tok.encode(E)
    N = 15
    budget = ReasoningBudget(tok, N)
    forcer = PrefixThenBudget(start_ids, budget)
    new = generate(model, ids, max_new_tokens=N + len(end_ids) + 6, stop_ids=[], force=forcer.force)
    assert new[:len(start_ids)] == start_ids
    assert budget.record.forced and budget.record.forced_at == N
    assert new[N:N + len(end_ids)] == end_ids, "the end marker's ids follow the budget's last thinking token"
    # what follows is the model's own greedy continuation of prompt + everything so far: the forced ids went
    # through the cache like generated ones
    head = N + len(end_ids)
    cont = generate(model, np.concatenate([ids, new[:head]]), max_new_tokens=6, stop_ids=[])
    assert new[head:] == cont
    reasoning, answer = proc.split_reasoning(proc.decode(new, skip_special=True))
    assert reasoning is not None and proc.decode(new[head:], skip_special=True).lstrip() == answer


def test_budget_leaves_non_thinking_output_alone(model, proc):
    from pykimi.generate import generate

    ids = _prompt(proc)
    budget = ReasoningBudget(proc.tokenizer, 0)
    a = generate(model, ids, max_new_tokens=12, stop_ids=[], force=budget.force)
    assert a == generate(model, ids, max_new_tokens=12, stop_ids=[]) and not budget.record.forced


def test_budget_start_in_reasoning(model, proc):
    from pykimi.generate import generate

    end_ids = proc.tokenizer.encode(E)
    budget = ReasoningBudget(proc.tokenizer, 4, start_in_reasoning=True)
    new = generate(model, _prompt(proc), max_new_tokens=4 + len(end_ids) + 2, stop_ids=[], force=budget.force)
    assert new[4:4 + len(end_ids)] == end_ids


def test_budget_rejects_bad_values(proc):
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="budget"):
            ReasoningBudget(proc.tokenizer, bad)


# ------------------------------------------------------------------------------------------ CLI
SCRIPT = f"{S} Two circles, both red. {E} There are two red circles."


@pytest.fixture
def scripted(monkeypatch, proc):
    """The tiny model's own decode loop with the token choice replaced by a script (the tiny model cannot think):
    everything the CLI does around it -- stream decoding, splitting, display, JSON, budget, history -- is real."""
    import pykimi.generate as g

    def install(text, stop=True):
        ids = proc.tokenizer.encode(text) + ([proc.tokenizer.im_end_id] if stop else [])
        calls = {"n": 0}

        def pick(logits, *a, **k):
            i = calls["n"]
            calls["n"] += 1
            return ids[i] if i < len(ids) else ids[-1]
        monkeypatch.setattr(g, "pick_token", pick)
        return ids
    return install


def run_cli(capsys, *args, stdin=None):
    from pykimi.cli import main

    if stdin is not None:
        old = sys.stdin
        sys.stdin = io.StringIO(stdin)
    try:
        code = main(list(args))
    finally:
        if stdin is not None:
            sys.stdin = old
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_reasoning_modes(scripted, capsys, tiny_dir):
    scripted(SCRIPT)
    code, out, err = run_cli(capsys, "run", "-m", tiny_dir, "-p", "How many?", "-n", "200")
    assert code == 0, err
    assert out == "[reasoning]\nTwo circles, both red.\n[answer]\nThere are two red circles.\n"
    scripted(SCRIPT)
    code, out, _ = run_cli(capsys, "run", "-m", tiny_dir, "-p", "How many?", "-n", "200", "--reasoning", "hide")
    assert out == "There are two red circles.\n"
    scripted(SCRIPT)
    code, out, _ = run_cli(capsys, "run", "-m", tiny_dir, "-p", "How many?", "-n", "200", "--reasoning", "raw")
    assert out == SCRIPT + "\n"
    scripted(SCRIPT)
    code, out, _ = run_cli(capsys, "run", "-m", tiny_dir, "-p", "How many?", "-n", "200", "--no-stream")
    assert out == "[reasoning]\nTwo circles, both red.\n[answer]\nThere are two red circles.\n"
    scripted(SCRIPT)
    code, out, _ = run_cli(capsys, "run", "-m", tiny_dir, "-p", "How many?", "-n", "200", "--json")
    j = json.loads(out)
    assert j["reasoning"] == "Two circles, both red." and j["answer"] == "There are two red circles."
    assert j["text"] == SCRIPT


def test_cli_dims_reasoning_on_a_terminal():
    from pykimi.cli import ReasoningView

    buf = io.StringIO()
    v = ReasoningView("show", buf, color=True)
    v.write([("reasoning", "think"), ("answer", "ans")])
    assert buf.getvalue() == "[reasoning]\n\x1b[2mthink\x1b[0m\n[answer]\nans"


def test_cli_no_markers_prints_as_before(scripted, capsys, tiny_dir):
    scripted("Just an answer.")
    code, out, _ = run_cli(capsys, "run", "-m", tiny_dir, "-p", "x", "-n", "50", "--json")
    j = json.loads(out)
    assert j["reasoning"] is None and j["answer"] == j["text"] == "Just an answer."


def test_cli_reasoning_budget(scripted, capsys, tiny_dir, proc):
    scripted(f"{S} " + "hmm " * 40 + f"{E} Done.", stop=True)
    code, out, err = run_cli(capsys, "run", "-m", tiny_dir, "-p", "x", "-n", "40", "--json",
                             "--reasoning-budget", "12")
    assert code == 0, err
    j = json.loads(out)
    end_ids = proc.tokenizer.encode(E)
    assert j["ids"][12:12 + len(end_ids)] == end_ids
    assert j["stats"]["reasoning_budget"] == {"budget": 12, "forced": True, "forced_at": 12}
    assert j["reasoning"] is not None and E not in j["reasoning"] and len(j["ids"]) == 40


def test_cli_bad_budget_is_one_line(capsys, tiny_dir):
    with pytest.raises(SystemExit) as e:
        run_cli(capsys, "run", "-m", tiny_dir, "--reasoning-budget", "-3")
    assert e.value.code == 2
    assert "expected an integer >= 0" in capsys.readouterr().err


def test_chat_keeps_reasoning_out_of_the_next_prompt(scripted, capsys, tiny_dir, monkeypatch):
    from pykimi.processor import Processor

    prompts = []
    real = Processor.prepare

    def spy(self, messages, *a, **k):
        prompts.append(self.apply_chat_template(messages))
        return real(self, messages, *a, **k)
    monkeypatch.setattr(Processor, "prepare", spy)
    scripted(SCRIPT)
    code, out, err = run_cli(capsys, "chat", "-m", tiny_dir, "-n", "120", stdin="How many?\nAnd now?\n")
    assert code == 0, err
    assert len(prompts) == 2
    assert "Two circles, both red" not in prompts[1] and S not in prompts[1]
    assert "<|im_assistant|>assistant<|im_middle|>There are two red circles.<|im_end|>" in prompts[1]


def test_template_drops_reasoning_content():
    """The Kimi-VL template (the released text, rendered by Jinja, and pykimi's native renderer) writes
    message['content'] and nothing else: a reasoning_content field never reaches the prompt, while markers
    left inside content are kept verbatim. pykimi chat therefore keeps only the answer as content."""
    from pykimi.tokenizer import ChatTemplate, builtin_chat_template, render_kimi_chat

    msgs = [{"role": "user", "content": "How many?"},
            {"role": "assistant", "content": "Two.", "reasoning_content": "I count two."},
            {"role": "user", "content": "Sure?"}]
    jinja = ChatTemplate(builtin_chat_template() + "\n{# not native #}", origin="test")
    assert not jinja.native
    a, b = render_kimi_chat(msgs), jinja.render(msgs)
    assert a == b and "I count two" not in a
    assert "<|im_assistant|>assistant<|im_middle|>Two.<|im_end|>" in a
    raw = [dict(msgs[1], content=f"{S}I count two.{E}Two.")]
    assert f"{S}I count two.{E}Two." in render_kimi_chat(msgs[:1] + raw)


# ------------------------------------------------------------------------------------------ server fields
def test_message_fields_and_delta_stream(proc):
    from pykimi.reasoning import DeltaStream, check_reasoning_format, message_fields

    assert message_fields(SCRIPT) == {"content": "There are two red circles.",
                                      "reasoning_content": "Two circles, both red."}
    assert message_fields(SCRIPT, "none") == {"content": SCRIPT}
    assert message_fields("plain") == {"content": "plain"}                # no reasoning_content at all
    for fmt in ("auto", "deepseek", "none", None):
        ds = DeltaStream(proc.tokenizer, fmt)
        deltas = []
        for i in proc.tokenizer.encode(SCRIPT):
            deltas += ds.add(i)
        deltas += ds.flush()
        joined = {}
        for d in deltas:
            (k, v), = d.items()
            joined[k] = joined.get(k, "") + v
        assert joined == ds.message() == message_fields(SCRIPT, fmt)
        if fmt != "none":
            kinds = [next(iter(d)) for d in deltas]
            assert kinds == sorted(kinds, key=lambda k: k != "reasoning_content")
    with pytest.raises(ValueError, match="reasoning_format"):
        check_reasoning_format("r1")
