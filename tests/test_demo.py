"""The bundled demo checkpoint (issue 7): its files, the shapes-task generator, and a handful of
fixed scenes whose exact answers pykimi's greedy decoding must produce.

The checkpoint (pykimi/demo/) was made by tools/train_demo.py; tools/eval_demo.py measures it on
300 fresh scenes. These tests need only NumPy and Pillow (plus pykimi itself for the answers).
"""
from __future__ import annotations

import base64
import json
import os
import struct

import numpy as np
import pytest

from pykimi import scenes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "pykimi", "demo")
GOLDEN_CONFIG = os.path.join(ROOT, "tests", "golden", "tiny-kimi-vl", "config.json")

# (seed, question, exact answer): the scene is scenes.random_scene(np.random.default_rng(seed)).
# Every question of the scenes of seeds 100-106 (one to three shapes, every question type; the bundled model
# answers all 20 right with pykimi greedy, 2026-11-30, as it does every question of seeds 100-111), plus
# seed 108's three-shape description: three-shape descriptions were the old models' typical error
# (pykimi/demo/README.md). The answer strings are also re-derived from the generator below, so a
# drifting generator fails loudly.
FIXED_CASES = (
    (100, "How many shapes are there?", "There is 1 shape."),
    (100, "What color is the square?", "The square is red."),
    (100, "Describe the image.", "A red square."),
    (101, "How many shapes are there?", "There are 3 shapes."),
    (101, "What color is the triangle?", "The triangle is red."),
    (101, "Describe the image.", "A red triangle, a red square and a green square."),
    (102, "How many shapes are there?", "There are 2 shapes."),
    (102, "Describe the image.", "A red square and a yellow square."),
    (103, "How many shapes are there?", "There is 1 shape."),
    (103, "What color is the circle?", "The circle is blue."),
    (103, "Describe the image.", "A blue circle."),
    (104, "How many shapes are there?", "There are 2 shapes."),
    (104, "What color is the square?", "The square is green."),
    (104, "What color is the triangle?", "The triangle is green."),
    (104, "Describe the image.", "A green triangle and a green square."),
    (105, "How many shapes are there?", "There are 3 shapes."),
    (105, "What color is the triangle?", "The triangle is blue."),
    (105, "Describe the image.", "A green square, a blue square and a blue triangle."),
    (106, "How many shapes are there?", "There are 2 shapes."),
    (106, "Describe the image.", "A yellow circle and a red circle."),
    (108, "Describe the image.", "A red square, a green square and a green triangle."),
)


def _read_header(path):
    """safetensors header, parsed by hand (8-byte little-endian length + JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def _n_base():
    with open(os.path.join(DEMO, "tiktoken.model"), "rb") as f:
        return sum(1 for line in f if line.strip())


def _config():
    with open(os.path.join(DEMO, "config.json")) as f:
        return json.load(f)


def expected_tensors(cfg):
    """name -> shape of every tensor of a Kimi-VL checkpoint with this config (spec §3)."""
    v, t = cfg["vision_config"], cfg["text_config"]
    C, I, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    out = {
        "vision_tower.patch_embed.proj.weight": [C, 3, p, p],
        "vision_tower.patch_embed.proj.bias": [C],
        "vision_tower.patch_embed.pos_emb.weight": [v["init_pos_emb_height"], v["init_pos_emb_width"], C],
        "vision_tower.encoder.final_layernorm.weight": [C],
        "vision_tower.encoder.final_layernorm.bias": [C],
    }
    for n in range(v["num_hidden_layers"]):
        b = f"vision_tower.encoder.blocks.{n}."
        for norm in ("norm0", "norm1"):
            out[b + norm + ".weight"] = [C]
            out[b + norm + ".bias"] = [C]
        out.update({b + "wqkv.weight": [3 * C, C], b + "wqkv.bias": [3 * C], b + "wo.weight": [C, C],
                    b + "wo.bias": [C], b + "mlp.fc0.weight": [I, C], b + "mlp.fc0.bias": [I],
                    b + "mlp.fc1.weight": [C, I], b + "mlp.fc1.bias": [C]})
    k = cfg["vision_config"]["merge_kernel_size"]
    M, H = C * k[0] * k[1], t["hidden_size"]
    out.update({"multi_modal_projector.pre_norm.weight": [C], "multi_modal_projector.pre_norm.bias": [C],
                "multi_modal_projector.linear_1.weight": [M, M], "multi_modal_projector.linear_1.bias": [M],
                "multi_modal_projector.linear_2.weight": [H, M], "multi_modal_projector.linear_2.bias": [H]})
    V, nh = t["vocab_size"], t["num_attention_heads"]
    dn, dr, dv, r = t["qk_nope_head_dim"], t["qk_rope_head_dim"], t["v_head_dim"], t["kv_lora_rank"]
    out.update({"language_model.model.embed_tokens.weight": [V, H], "language_model.model.norm.weight": [H],
                "language_model.lm_head.weight": [V, H]})
    for l in range(t["num_hidden_layers"]):
        b = f"language_model.model.layers.{l}."
        out.update({b + "input_layernorm.weight": [H], b + "post_attention_layernorm.weight": [H],
                    b + "self_attn.q_proj.weight": [nh * (dn + dr), H],
                    b + "self_attn.kv_a_proj_with_mqa.weight": [r + dr, H],
                    b + "self_attn.kv_a_layernorm.weight": [r],
                    b + "self_attn.kv_b_proj.weight": [nh * (dn + dv), r],
                    b + "self_attn.o_proj.weight": [H, nh * dv],
                    b + "self_attn.rotary_emb.inv_freq": [dr // 2]})
        if l >= t["first_k_dense_replace"] and l % t["moe_layer_freq"] == 0:
            E, Ie = t["n_routed_experts"], t["moe_intermediate_size"]
            Is = Ie * t["n_shared_experts"]
            out.update({b + "mlp.gate.weight": [E, H], b + "mlp.gate.e_score_correction_bias": [E],
                        b + "mlp.shared_experts.gate_proj.weight": [Is, H],
                        b + "mlp.shared_experts.up_proj.weight": [Is, H],
                        b + "mlp.shared_experts.down_proj.weight": [H, Is]})
            for e in range(E):
                out.update({b + f"mlp.experts.{e}.gate_proj.weight": [Ie, H],
                            b + f"mlp.experts.{e}.up_proj.weight": [Ie, H],
                            b + f"mlp.experts.{e}.down_proj.weight": [H, Ie]})
        else:
            Id = t["intermediate_size"]
            out.update({b + "mlp.gate_proj.weight": [Id, H], b + "mlp.up_proj.weight": [Id, H],
                        b + "mlp.down_proj.weight": [H, Id]})
    return out


# ------------------------------------------------------------------------------ the bundled files

def test_bundled_files_present_and_small():
    for name in ("config.json", "model.safetensors", "tiktoken.model", "preprocessor_config.json",
                 "tokenizer_config.json", "README.md"):
        assert os.path.isfile(os.path.join(DEMO, name)), f"pykimi/demo/{name} is missing"
    total = sum(os.path.getsize(os.path.join(DEMO, f)) for f in os.listdir(DEMO))
    assert total <= 15e6, f"the demo checkpoint is {total / 1e6:.1f} MB, over the 15 MB budget"


def test_config_has_the_real_schema():
    cfg = _config()
    with open(GOLDEN_CONFIG) as f:
        ref = json.load(f)  # same keys as the released config.json
    assert set(cfg) == set(ref)
    assert set(cfg["vision_config"]) == set(ref["vision_config"])
    assert set(cfg["text_config"]) == set(ref["text_config"])
    assert cfg["model_type"] == "kimi_vl" and cfg["vision_config"]["model_type"] == "moonvit"
    n_base = _n_base()
    t = cfg["text_config"]
    # special ids at the real tokenizer's offsets: real id - 163584 + n_base (spec §4)
    assert cfg["vocab_size"] == t["vocab_size"] == n_base + 256
    assert cfg["media_placeholder_token_id"] == n_base + 21
    assert (t["bos_token_id"], t["eos_token_id"], t["pad_token_id"]) == (n_base, n_base + 1, n_base + 255)
    assert t["q_lora_rank"] is None and t["topk_method"] == "noaux_tc" and t["scoring_func"] == "sigmoid"


def test_tensor_names_shapes_dtypes():
    cfg = _config()
    header = _read_header(os.path.join(DEMO, "model.safetensors"))
    header.pop("__metadata__", None)
    want = expected_tensors(cfg)
    assert sorted(header) == sorted(want), (sorted(set(header) ^ set(want)))[:10]
    for name, info in header.items():
        assert info["shape"] == want[name], f"{name}: shape {info['shape']}, expected {want[name]}"
        dtype = "F32" if name.endswith("e_score_correction_bias") else "BF16"
        assert info["dtype"] == dtype, f"{name}: dtype {info['dtype']}, expected {dtype}"


def test_correction_bias_is_nonzero():
    # the router's selection-only bias was trained (aux-loss-free balancing), so it matters
    with open(os.path.join(DEMO, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        for name, info in header.items():
            if name.endswith("e_score_correction_bias"):
                a, b = info["data_offsets"]
                f.seek(8 + n + a)
                bias = np.frombuffer(f.read(b - a), dtype="<f4")
                assert np.abs(bias).max() > 1e-3, name


def test_tiktoken_model_format():
    with open(os.path.join(DEMO, "tiktoken.model"), "rb") as f:
        lines = [line.split() for line in f if line.strip()]
    assert [int(r) for _, r in lines] == list(range(len(lines)))
    toks = [base64.b64decode(t) for t, _ in lines]
    assert toks[:256] == [bytes([i]) for i in range(256)]   # the single bytes first
    assert len(set(toks)) == len(toks)


def test_loads_through_the_ordinary_checkpoint_path():
    weights = pytest.importorskip("pykimi.weights")
    config = pytest.importorskip("pykimi.config")
    cfg = config.load_config(DEMO)
    assert cfg.media_placeholder_token_id == _config()["media_placeholder_token_id"]
    ck = weights.Checkpoint.open(DEMO)
    want = expected_tensors(_config())
    assert sorted(ck.names()) == sorted(want)
    for name in ("language_model.model.layers.1.mlp.experts.7.down_proj.weight",
                 "vision_tower.patch_embed.pos_emb.weight"):
        assert list(ck.info(name).shape) == want[name]
        assert np.isfinite(ck.f32(name)).all()


def test_tokenizer_round_trips_the_task_text():
    tok_mod = pytest.importorskip("pykimi.tokenizer")
    tok = tok_mod.Tokenizer.from_pretrained(DEMO)
    texts = [scenes.QUESTION_COUNT, scenes.QUESTION_DESCRIBE, scenes.color_question("triangle"),
             "A red circle, a blue square and a green triangle.", "There is 1 shape."]
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert len(ids) <= len(t.split()) + 3   # the task words are whole tokens


# ------------------------------------------------------------------------------ the task generator

def test_scene_generator_is_exact_and_seeded():
    img, shapes = scenes.random_scene(np.random.default_rng(123))
    assert img.size == (113, 189)
    assert shapes == [scenes.Shape("circle", "yellow", 21, 30, 33), scenes.Shape("square", "red", 60, 68, 38)]
    assert scenes.qa_pairs(shapes) == [
        ("How many shapes are there?", "There are 2 shapes.", "count"),
        ("What color is the circle?", "The circle is yellow.", "color"),
        ("What color is the square?", "The square is red.", "color"),
        ("Describe the image.", "A yellow circle and a red square.", "describe"),
    ]


def test_scene_rules_hold():
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(200):
        img, shapes = scenes.random_scene(rng)
        w, h = img.size
        assert 112 <= w <= 224 and 112 <= h <= 224 and 1 <= len(shapes) <= 3
        seen.add(len(shapes))
        px = np.asarray(img)
        for s in shapes:
            assert 24 <= s.size <= 64 and s.x >= 0 and s.y >= 0 and s.x + s.size <= w and s.y + s.size <= h
            # a pixel just below the center is inside every kind of shape and has its exact color
            assert tuple(px[int(s.cy) + 2, int(s.cx)]) == scenes.COLORS[s.color]
        for i, a in enumerate(shapes):
            for b in shapes[i + 1:]:
                assert (a.x + a.size <= b.x or b.x + b.size <= a.x or a.y + a.size <= b.y or b.y + b.size <= a.y)
                assert abs(a.cx - b.cx) >= scenes.MIN_DX
    assert seen == {1, 2, 3}


def test_answer_strings():
    S = scenes.Shape
    assert scenes.count_answer([S("circle", "red", 0, 0, 30)]) == "There is 1 shape."
    assert scenes.describe_answer([S("square", "blue", 90, 0, 30), S("circle", "red", 0, 0, 30)]) == \
        "A red circle and a blue square."
    assert scenes.describe_answer([S("triangle", "green", 150, 0, 30), S("circle", "red", 0, 0, 30),
                                   S("square", "blue", 80, 50, 30)]) == \
        "A red circle, a blue square and a green triangle."
    two_circles = [S("circle", "red", 0, 0, 30), S("circle", "blue", 80, 0, 30)]
    assert [t for _, _, t in scenes.qa_pairs(two_circles)] == ["count", "describe"]  # no ambiguous color question


# ------------------------------------------------------------------------------ pykimi's answers

@pytest.fixture(scope="module")
def demo_model():
    try:
        import pykimi
        model = pykimi.load(pykimi.demo_checkpoint())
        proc = pykimi.Processor.from_pretrained(pykimi.demo_checkpoint())
    except (ImportError, AttributeError, NotImplementedError) as e:
        pytest.skip(f"pykimi.load / Processor not available yet: {e}")
    return model, proc


@pytest.mark.parametrize("seed,question,answer", FIXED_CASES)
def test_fixed_scene_answers(demo_model, seed, question, answer):
    model, proc = demo_model
    img, shapes = scenes.random_scene(np.random.default_rng(seed))
    assert (question, answer) in [(q, a) for q, a, _ in scenes.qa_pairs(shapes)]
    stop = set(int(i) for i in proc.stop_ids)
    text = proc.apply_chat_template(scenes.messages_for(question), add_generation_prompt=True)
    inputs = proc(text=text, images=[img])
    ids = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"],
                         max_new_tokens=32, temperature=0.0)
    got = proc.decode([int(i) for i in ids if int(i) not in stop])
    assert got == answer, f"seed {seed}: {question!r} -> {got!r}, expected {answer!r}"
