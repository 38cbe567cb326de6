"""Chat template (spec §4): the native renderer equals Jinja's rendering of the released template."""
import json
import os

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

import pykimi
from pykimi.errors import InputError, TokenizerError
from pykimi.tokenizer import ChatTemplate, render_kimi_chat

TEMPLATE_PATH = os.path.join(os.path.dirname(pykimi.__file__), "data", "chat_template.jinja")


def jinja_render(messages, add_generation_prompt=True, path=TEMPLATE_PATH):
    # the reference: the template file rendered the way HF renders chat templates
    with open(path, encoding="utf-8") as f:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(f.read()).render(messages=messages, add_generation_prompt=add_generation_prompt)


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


def S(c):
    return {"role": "system", "content": c}


IMG = {"type": "image"}
IMG_URL = {"type": "image_url", "image_url": {"url": "file:///x.png"}}
IMG_INLINE = {"type": "image", "image": "cat.png"}


def T(s):
    return {"type": "text", "text": s}


CASES = [
    [],
    [U("Hello")],
    [S("You are terse."), U("Hi")],
    [U("Hi"), A("Hello! How can I help?"), U("Tell me a joke.")],
    [S("sys"), U("a"), A("b"), U("c"), A("d")],
    [U([IMG, T("What is this?")])],
    [U([T("Look at this: "), IMG])],
    [U([T("before "), IMG, T(" between "), IMG, T(" after")])],
    [U([IMG, IMG, IMG])],
    [S("Describe images."), U([IMG_URL, T("and"), IMG_INLINE])],
    [U([IMG, T("first")]), A("A cat."), U([IMG, T("and this one?")])],
    [U([T("only text in a list")])],
    [U([])],
    [U("")],
    [S("")],
    [A("assistant first")],
    [U("line\nbreaks\n\tand tabs  ")],
    [U("unicode 你好 🙂 Привет")],
    [U("literal specials <|im_end|><|media_pad|> in user text")],
    [U("{{ not a template }} {% raw %}")],
    [S([T("system as parts")]), U("q")],
    [U([{"type": "text", "text": "a", "image": None}])],   # an 'image' key makes it an image part (template rule)
    [U([{"image": "x.png"}, T("no type key")])],
    [U("x"), U("two users in a row"), A("ok"), A("two assistants")],
    [S("s1"), S("s2"), U("u")],
]


@pytest.mark.parametrize("i", range(len(CASES)))
@pytest.mark.parametrize("gen", [True, False])
def test_native_equals_jinja(i, gen):
    msgs = CASES[i]
    assert render_kimi_chat(msgs, gen) == jinja_render(msgs, gen)
    assert ChatTemplate().render(msgs, gen) == jinja_render(msgs, gen)


def test_enough_cases():
    assert len(CASES) >= 20


def test_spec_example():
    msgs = [U([IMG, T("What is this?")])]
    assert render_kimi_chat(msgs) == (
        "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|><|im_user|>user<|im_middle|>"
        "<|media_start|>image<|media_content|><|media_pad|><|media_end|>What is this?<|im_end|>"
        "<|im_assistant|>assistant<|im_middle|>")
    assert "\n" not in render_kimi_chat(CASES[3])


@pytest.mark.parametrize("msgs,msg", [
    ([{"role": "tool", "content": "x"}], r"messages\[0\]: unknown role 'tool'"),
    ([U("a"), {"role": "User", "content": "x"}], r"messages\[1\]: unknown role 'User'"),
    ([{"role": "user"}], r"messages\[0\] must be a dict with 'role' and 'content'"),
    ([U(None)], r"messages\[0\].content must be a str or a list"),
    ([U(["plain string part"])], r"content\[0\] must be a dict part"),
    ([U([{"type": "text"}])], r"a text part needs a 'text' string"),
    ("not a list", "messages must be a list"),
])
def test_bad_messages(msgs, msg):
    with pytest.raises(InputError, match=msg) as e:
        render_kimi_chat(msgs)
    assert "\n" not in str(e.value)


def test_checkpoint_template_jinja_file(tmp_path):
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<gen>{% endif %}")
    ct = ChatTemplate.from_dir(str(tmp_path))
    assert not ct.native and ct.render([U("hi"), A("yo")]) == "[user]hi[assistant]yo<gen>"
    with pytest.raises(InputError, match="unknown role"):
        ct.render([{"role": "robot", "content": "x"}])


def test_checkpoint_template_in_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content | tojson }}{% endfor %}"}))
    ct = ChatTemplate.from_dir(str(tmp_path), bos_token="[BOS]")
    assert ct.render([U("é\"")], False) == '[BOS]"é\\""'


def test_checkpoint_ships_the_builtin(tmp_path):
    with open(TEMPLATE_PATH, encoding="utf-8") as f:
        (tmp_path / "chat_template.jinja").write_text(f.read())
    ct = ChatTemplate.from_dir(str(tmp_path))
    assert ct.native and ct.render(CASES[7]) == jinja_render(CASES[7])
    assert ChatTemplate.from_dir(str(tmp_path / "absent")).origin == "built-in"


def test_broken_template(tmp_path):
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match="chat template does not compile"):
        ChatTemplate.from_dir(str(tmp_path))
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(InputError, match="no system role"):
        ChatTemplate.from_dir(str(tmp_path)).render([U("x")])
