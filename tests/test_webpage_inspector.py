"""The web page's inspector JSON (pykimi/server/inspector.py) against an independent traced forward pass.

The inspector teacher-forces the answer (prompt prefilled untraced, answer rows traced); here the same numbers
are taken from one plain ``model.forward`` over prompt + answer under ``pykimi.trace``, so a misaligned row, a
wrong image slice or a wrong head sum shows up as a mismatch.
"""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

import pykimi
from pykimi import scenes
from pykimi.errors import InputError
from pykimi.server.inspector import chat_inputs, inspect_answer

LM = "language_model.model"


@pytest.fixture(scope="module")
def demo():
    path = pykimi.demo_checkpoint()
    model = pykimi.load(path)
    proc = pykimi.Processor.from_pretrained(path)
    img, shapes = scenes.random_scene(np.random.default_rng(21), n_shapes=3)
    msgs = [{"role": "user", "content": [{"type": "image", "image": img},
                                         {"type": "text", "text": scenes.QUESTION_COUNT}]}]
    inp = proc.prepare(msgs)
    ids = model.generate(inp["input_ids"], inp["pixel_values"], inp["image_grid_hws"], max_new_tokens=16)
    answer = proc.decode(ids, skip_special=True)
    assert answer == scenes.count_answer(shapes), answer
    return model, proc, img, msgs, inp, answer


def _data_uri(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _reference(model, inp, ans_ids, vblock, layer):
    """One traced forward over prompt + answer: logits, routing, LM and vision attention probabilities."""
    ids = np.concatenate([inp["input_ids"], ans_ids])
    names = [f"{LM}.layers.*.mlp.routing"]
    with pykimi.trace(model, names=names, attn_probs=[f"vision_tower.encoder.blocks.{vblock}",
                                                      f"{LM}.layers.{layer}.self_attn"]) as t:
        logits = model.forward(ids, inp["pixel_values"], inp["image_grid_hws"])
    return ids, logits, t


def test_inspector_matches_a_traced_forward(demo):
    model, proc, img, msgs, inp, answer = demo
    tc, vc = model.config.text, model.config.vision
    out = inspect_answer(model, proc, msgs, answer=answer, vision_block=1, lm_layer=2)
    ans = np.asarray(proc.tokenizer.encode(answer))
    n, S = ans.size, inp["input_ids"].size
    ids, logits, t = _reference(model, inp, ans, 1, 2)
    rows = np.arange(S - 1, S - 1 + n)                         # the steps that chose each answer token

    # tokens: the answer, top-5 from the step's logits (greedy answer -> rank 1 everywhere)
    assert [tk["id"] for tk in out["tokens"]] == ans.tolist()
    assert "".join(tk["text"] for tk in out["tokens"]) == answer
    p = np.exp(logits[rows] - logits[rows].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for i, tk in enumerate(out["tokens"]):
        top = [c["id"] for c in tk["top"]]
        assert len(top) == 5 and top[0] == ans[i] and tk["rank"] == 1, (i, tk)
        assert set(top) == set(np.argsort(-p[i])[:5].tolist()), (i, top)
        ps = [c["p"] for c in tk["top"]]
        assert ps == sorted(ps, reverse=True) and sum(ps) <= 1.0 + 1e-3
        assert np.allclose(ps, np.sort(p[i])[::-1][:5], rtol=1e-3, atol=1e-6), (i, ps)

    # routing: chosen experts and scores of the same rows of the full forward
    r = out["routing"]
    assert r["layers"] == [l for l in range(tc.num_hidden_layers) if tc.is_moe_layer(l)]
    assert r["n_shared"] == tc.n_shared_experts and r["k"] == tc.num_experts_per_tok
    for j, l in enumerate(r["layers"]):
        rec = t.records[f"{LM}.layers.{l}.mlp.routing"][0]
        for i in range(n):
            assert r["chosen"][i][j] == rec.topk_ids[rows[i]].tolist(), (i, l)
            np.testing.assert_allclose(r["scores"][i][j], rec.scores[rows[i]], atol=2e-4)
            np.testing.assert_allclose(r["weights"][i][j], rec.topk_weights[rows[i]], atol=2e-4)

    # LM attention on the image tokens, summed over heads, in the merged grid's raster order
    lm = out["lm_attention"]
    probs = t[f"{LM}.layers.2.self_attn.attn_probs"]              # [H, S+n, S+n]
    cols = np.flatnonzero(inp["input_ids"] == model.config.media_placeholder_token_id)
    th, tw = lm["grid"]
    assert th * tw == cols.size and lm["pool"] == 1
    for i in range(n):
        ref = probs[:, rows[i], cols].sum(0)
        np.testing.assert_allclose(np.asarray(lm["maps"][i]).ravel(), ref, atol=2e-4)
        assert lm["top"][i][0]["token"] == int(np.argmax(ref))
        assert abs(lm["image_mass"][i] - ref.sum() / tc.num_attention_heads) < 2e-4
    assert any(lm["maps"][i] != lm["maps"][0] for i in range(1, n)), "every token attends alike?"

    # vision attention: mean over heads and query patches of block 1
    va = out["vision_attention"]
    vp = t["vision_tower.encoder.blocks.1.attn_probs"]            # [H, L, L] (one image)
    gh, gw = inp["image_grid_hws"][0]
    assert va["grid"] == [gh, gw] and va["shape"] == [gh, gw]
    np.testing.assert_allclose(np.asarray(va["map"]).ravel(), vp.mean(0).mean(0), atol=2e-5)
    assert abs(np.sum(va["map"]) - 1) < 1e-3                     # a mean of probability rows


def test_inspector_head_patch_and_image(demo):
    model, proc, img, msgs, inp, answer = demo
    gh, gw = (int(v) for v in inp["image_grid_hws"][0])
    with pykimi.trace(model, names=[], attn_probs=["vision_tower.encoder.blocks.0"]) as t:
        model.encode_images(inp["pixel_values"], inp["image_grid_hws"])
    vp = t["vision_tower.encoder.blocks.0.attn_probs"]
    q = gw + 3
    out = inspect_answer(model, proc, msgs, answer=answer, vision_block=0, vision_head=2, vision_patch=q)
    np.testing.assert_allclose(np.asarray(out["vision_attention"]["map"]).ravel(), vp[2, q], atol=2e-5)
    other = inspect_answer(model, proc, msgs, answer=answer, vision_block=0, vision_head=2, vision_patch=q + 5)
    assert other["vision_attention"]["map"] != out["vision_attention"]["map"]

    im = out["image"]
    assert im["grid"] == [gh, gw] and im["merged_grid"] == [gh // 2, gw // 2] and im["patch"] == 14
    assert im["original"] == list(img.size) and im["padded"] == [gw * 14, gh * 14]
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(im["preview"].split(",", 1)[1]))).convert("RGB"))
    assert seen.shape == (gh * 14, gw * 14, 3)                    # the padded picture, lossless at demo size
    w, h = img.size
    assert np.array_equal(seen[:h, :w], np.asarray(img))          # the pixels the tower saw
    assert (seen[h:] == 0).all() and (seen[:, w:] == 0).all()     # zero padding right / bottom


def test_inspector_takes_openai_messages(demo):
    model, proc, img, msgs, inp, answer = demo
    oai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(img)}},
                                        {"type": "text", "text": scenes.QUESTION_COUNT}]}]
    a = inspect_answer(model, proc, oai, answer=answer)
    b = inspect_answer(model, proc, msgs, answer=answer)
    assert a["tokens"] == b["tokens"] and a["routing"] == b["routing"]
    assert a["prompt_tokens"] == inp["input_ids"].size


@pytest.mark.parametrize("kw, msg", [
    (dict(answer=""), "empty"),
    (dict(answer=None), "answer"),
    (dict(answer="x", vision_block=99), "vision_block=99"),
    (dict(answer="x", lm_layer=-1), "lm_layer=-1"),
    (dict(answer="x", vision_head=4), "vision_head=4"),
    (dict(answer="x", vision_patch=10 ** 6), "vision_patch"),
    (dict(answer="x", image=3), "image"),
])
def test_inspector_bad_fields(demo, kw, msg):
    model, proc, img, msgs, inp, answer = demo
    with pytest.raises(InputError, match=msg):
        inspect_answer(model, proc, msgs, **kw)


@pytest.mark.parametrize("url, msg", [
    ("http://example.com/a.png", "data: URIs"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "readable image"),
    ("data:text/plain,hello", "base64 data: URI"),
])
def test_chat_inputs_bad_images(url, msg):
    m = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
    with pytest.raises(InputError, match=msg):
        chat_inputs(m)


def test_register_endpoint(demo):
    starlette = pytest.importorskip("starlette")
    pytest.importorskip("httpx")
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from pykimi.server import inspector

    model, proc, img, msgs, inp, answer = demo
    app = Starlette()
    inspector.register(app, {"model": model, "processor": proc, "engine": None})
    oai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(img)}},
                                        {"type": "text", "text": scenes.QUESTION_COUNT}]}]
    with TestClient(app) as c:
        r = c.post("/pykimi/inspect", json={"messages": oai, "answer": answer, "lm_layer": 1})
        assert r.status_code == 200, r.text
        d = r.json()
        assert "".join(t["text"] for t in d["tokens"]) == answer and d["lm_attention"]["layer"] == 1
        for body, status in [("{", 400), ("[1]", 400)]:
            r = c.post("/pykimi/inspect", content=body, headers={"content-type": "application/json"})
            assert r.status_code == status and "error" in r.json()
        r = c.post("/pykimi/inspect", json={"messages": oai, "answer": answer, "vision_block": "x"})
        assert r.status_code == 400 and "vision_block" in r.json()["error"]["message"]
        r = c.post("/pykimi/inspect", json={"messages": oai, "answer": answer, "image": True})
        assert r.status_code == 400

    small = Starlette()
    inspector.register(small, {"model": model, "processor": proc, "engine": None, "api_key": "k",
                               "max_body_bytes": 1000})
    with TestClient(small) as c:
        body = {"messages": oai, "answer": answer}
        assert c.post("/pykimi/inspect", json=body).status_code == 401
        r = c.post("/pykimi/inspect", json=body, headers={"Authorization": "Bearer k"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = c.post("/pykimi/inspect", json={"messages": "x", "answer": "y"}, headers={"Authorization": "Bearer k"})
        assert r.status_code == 400


def test_inspector_ignores_other_threads(demo):
    """The server's engine decodes in another thread while the page inspects: nothing of it may land in the
    inspection (pykimi.trace is process-wide) and the inspection must not touch it."""
    import threading

    model, proc, img, msgs, inp, answer = demo
    alone = inspect_answer(model, proc, msgs, answer=answer)
    ids = inp["input_ids"]
    ref = model.forward(ids, inp["pixel_values"], inp["image_grid_hws"])
    stop, errors, runs = threading.Event(), [], []

    def busy():
        try:
            for _ in range(200):                                      # bounded
                if stop.is_set():
                    return
                runs.append(np.array_equal(model.forward(ids, inp["pixel_values"], inp["image_grid_hws"]), ref))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=busy)
    th.start()
    try:
        together = [inspect_answer(model, proc, msgs, answer=answer) for _ in range(3)]
    finally:
        stop.set()
        th.join(60)
    assert not errors and runs and all(runs), (errors, runs)
    for t in together:
        assert t == alone


def test_memo_gives_the_same_answers(demo):
    """A Memo reuses the prompt's work across views of one conversation; every view equals a fresh run, and
    another conversation (or another answer) is not served from the memo."""
    from pykimi.server.inspector import Memo

    model, proc, img, msgs, inp, answer = demo
    memo = Memo()
    views = [dict(), dict(lm_layer=1), dict(vision_block=0, vision_head=1), dict(vision_block=0, vision_patch=5),
             dict(vision_block=2), dict(lm_layer=0, vision_block=3, vision_head=3, vision_patch=0)]
    for kw in views:
        assert inspect_answer(model, proc, msgs, answer=answer, memo=memo, **kw) == \
            inspect_answer(model, proc, msgs, answer=answer, **kw), kw
    key = memo.key
    short = "There are"
    assert inspect_answer(model, proc, msgs, answer=short, memo=memo) == inspect_answer(model, proc, msgs, answer=short)
    assert memo.key == key                                         # same prompt: reused
    img2, _ = scenes.random_scene(np.random.default_rng(5), n_shapes=1)
    msgs2 = [{"role": "user", "content": [{"type": "image", "image": img2},
                                          {"type": "text", "text": scenes.QUESTION_COUNT}]}]
    assert inspect_answer(model, proc, msgs2, answer=answer, memo=memo) == \
        inspect_answer(model, proc, msgs2, answer=answer)
    assert memo.key != key
    assert inspect_answer(model, proc, msgs, answer=answer, memo=memo) == inspect_answer(model, proc, msgs, answer=answer)


def test_text_only_and_two_images(demo):
    model, proc, img, msgs, inp, answer = demo
    text = inspect_answer(model, proc, [{"role": "user", "content": "hello"}], answer="There are")
    assert text["image"] is None and text["vision_attention"] is None and text["lm_attention"]["maps"] is None
    assert [t["text"] for t in text["tokens"]] == ["There", " are"] and len(text["routing"]["chosen"]) == 2

    img2, _ = scenes.random_scene(np.random.default_rng(8), n_shapes=2)
    two = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "image", "image": img2},
                                        {"type": "text", "text": scenes.QUESTION_COUNT}]}]
    a, b = (inspect_answer(model, proc, two, answer=answer, image=i) for i in (0, 1))
    assert a["n_images"] == b["n_images"] == 2
    assert a["image"]["original"] == list(img.size) and b["image"]["original"] == list(img2.size)
    assert b == inspect_answer(model, proc, two, answer=answer)   # default: the last image
    # each image's token map has its own merged grid; together they hold the attention on both images
    ids = proc.prepare(two)["input_ids"]
    n_img_tokens = int((ids == model.config.media_placeholder_token_id).sum())
    ta, tb = (np.prod(x["lm_attention"]["grid"]) for x in (a, b))
    assert ta + tb == n_img_tokens


def test_long_answer_is_cut(demo, monkeypatch):
    from pykimi.server import inspector

    model, proc, img, msgs, inp, answer = demo
    full = inspect_answer(model, proc, msgs, answer=answer)
    monkeypatch.setattr(inspector, "MAX_ANSWER_TOKENS", 3)
    cut = inspect_answer(model, proc, msgs, answer=answer)
    assert cut["truncated"] and not full["truncated"] and cut["answer_tokens"] == 3
    assert cut["tokens"] == full["tokens"][:3]


def test_served_by_the_server_app(demo):
    """Through `pykimi serve`'s own app: the page at /, the inspector at /pykimi/inspect with the server's
    message parser (its image checks answer 400 in OpenAI's shape)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    app_mod = pytest.importorskip("pykimi.server.app")
    from starlette.testclient import TestClient

    from pykimi.engine import Engine

    model, proc, img, msgs, inp, answer = demo
    eng = Engine(model, parallel=1)                  # never started: the inspector does not need it to run
    app = app_mod.create_app(model, proc, eng)
    oai = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(img)}},
                                        {"type": "text", "text": scenes.QUESTION_COUNT}]}]
    with TestClient(app) as c:
        r = c.get("/")
        assert r.status_code == 200 and 'data-testid="inspector"' in r.text
        assert c.get("/app.js").status_code == 200 and c.get("/style.css").status_code == 200
        r = c.post("/pykimi/inspect", json={"messages": oai, "answer": answer})
        assert r.status_code == 200, r.text
        assert r.json() == inspect_answer(model, proc, msgs, answer=answer)
        bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        r = c.post("/pykimi/inspect", json={"messages": bad, "answer": answer})
        assert r.status_code == 400 and r.json()["error"]["message"], r.text
