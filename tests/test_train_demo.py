"""The demo training tool (tools/train_demo.py, issue 7): its torch twin of the architecture agrees
with pykimi on the bundled checkpoint, its packed training rows compute exactly what the unpacked
sequences would, its auxiliary labels say what they claim, and a tiny run exports a checkpoint
that pykimi loads through the ordinary path. Needs torch (an optional tool dependency): skipped
without it.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.reference  # an optional reference tool (.ci/run re-runs these)

torch = pytest.importorskip("torch", reason="tools/train_demo.py needs torch (pip install torch==2.13.0)")
pytest.importorskip("regex", reason="tools/train_demo.py trains its BPE with the regex package")

import pykimi  # noqa: E402
from pykimi import scenes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import train_demo as td  # noqa: E402


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.fixture(scope="module")
def twin():
    torch.set_num_threads(1)
    model, tok, cfg = td.load_exported(pykimi.demo_checkpoint())
    return model, tok, cfg


def test_torch_twin_matches_pykimi_on_the_bundled_checkpoint(twin):
    """Same weights, same prompt: the training tool's model and pykimi give the same logits, so what
    the tool measured while training is what pykimi runs."""
    model, tok, _ = twin
    img, _ = scenes.random_scene(np.random.default_rng(11))
    patches, grid = td.preprocess(img)
    n_tok = (grid[0] // 2) * (grid[1] // 2)
    ids = td.prompt_ids(tok, scenes.QUESTION_DESCRIBE, n_tok)
    with torch.no_grad():
        feats = model.encode_images([torch.from_numpy(patches)], [grid])
        want = model.language_model.lm_head(model.hidden(torch.tensor([ids]), feats))[0].numpy()

    pk = pykimi.load(pykimi.demo_checkpoint())
    proc = pykimi.Processor.from_pretrained(pykimi.demo_checkpoint())
    text = proc.apply_chat_template(scenes.messages_for(scenes.QUESTION_DESCRIBE), add_generation_prompt=True)
    inputs = proc(text=text, images=[img])
    assert [int(i) for i in inputs["input_ids"]] == ids, "the tool's prompt differs from the chat template's"
    got = pk.forward(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"])
    err = rel_err(got.reshape(want.shape), want)
    print(f"logits: torch twin vs pykimi, scale-relative error {err:.2e}")
    assert err < 1e-4, f"logits differ by {err:.2e} (scale-relative)"


def test_packed_rows_compute_what_unpacked_sequences_do(twin):
    """pack_rows shares each image's prefix between its questions; every answer position must get
    the logits (and the label) of the same sequence run alone."""
    model, tok, _ = twin
    rng = np.random.default_rng(3)
    patches, grids, seqs, _ = td.make_batch(rng, 3, tok)
    seqs = seqs + td.copy_drill(rng, tok, 5)
    pad = tok.specials["[PAD]"]
    with torch.no_grad():
        feats = model.encode_images(patches, grids)
        per_img = list(torch.split(feats, [(g[0] // 2) * (g[1] // 2) for g in grids]))
        ids, labels = td.collate(seqs, pad)
        h = model.hidden(ids, torch.cat([per_img[s[2]] for s in seqs if s[2] is not None]))
        m = labels != -100
        lg1, rows1 = model.language_model.lm_head(h[m]), m.nonzero()[:, 0]
        ids2, pos, mask, labels2, sid, row_img = td.pack_rows(seqs, pad, text_group=3)
        h2 = model.hidden(ids2, torch.cat([per_img[i] for i in row_img if i is not None]), pos, mask)
        m2 = labels2 != -100
        lg2, rows2 = model.language_model.lm_head(h2[m2]), sid[m2]
    assert ids2.numel() < ids.numel(), "packing should shrink the batch"
    assert len(row_img) == 3 + 2 and row_img[3:] == [None, None], "5 drills in rows of 3: two text rows"
    for j in range(len(seqs)):
        assert torch.equal(labels[m][rows1 == j], labels2[m2][rows2 == j]), f"sequence {j}: labels differ"
        err = rel_err(lg2[rows2 == j].numpy(), lg1[rows1 == j].numpy())
        assert err < 1e-5, f"sequence {j} ({seqs[j][3]}): packed logits differ by {err:.2e}"


def test_aux_labels():
    rng = np.random.default_rng(5)
    for _ in range(30):
        img, shapes = scenes.random_scene(rng)
        _, grid = td.preprocess(img)
        seg, rank, count = td.aux_labels(shapes, grid)
        gh2, gw2 = grid[0] // 2, grid[1] // 2
        assert seg.shape == rank.shape == count.shape == (gh2 * gw2,)
        assert (count == len(shapes)).all()
        order = sorted(shapes, key=lambda s: s.cx)
        assert set(rank.tolist()) - {0} == set(range(1, len(shapes) + 1))   # every shape has cells
        px = np.asarray(img)
        for r, s in enumerate(order, 1):
            t = (int(s.cy) // 28) * gw2 + int(s.cx) // 28          # the cell of the shape's center
            cls = 1 + scenes.SHAPES.index(s.kind) * 4 + list(scenes.COLORS).index(s.color)
            assert (seg[t], rank[t]) == (cls, r), f"center cell of {s}: {(seg[t], rank[t])}, expected {(cls, r)}"
            # kind, color and rank are labelled together: same shape in both labels at every cell
            assert (seg[rank == r] == cls).all()
        # a cell is background exactly when no shape pixel falls into it
        H, W = gh2 * 28, gw2 * 28
        canvas = np.full((H, W, 3), 255, np.uint8)
        canvas[:px.shape[0], :px.shape[1]] = px
        shape_px = (canvas != 255).any(-1).reshape(gh2, 28, gw2, 28).any((1, 3)).reshape(-1)
        assert ((seg > 0) == shape_px).all()


def test_shape_mix_and_content_weight(twin):
    """--shape-mix draws the scenes' shape counts with the given weights; --content-weight only
    reweights tokens inside a sequence (weight 1 = the plain per-sequence mean; the color and kind
    words weigh more otherwise)."""
    model, tok, _ = twin
    rng = np.random.default_rng(9)
    _, _, seqs, (_, _, count) = td.make_batch(rng, 6, tok, shape_mix=(0, 0, 1))
    assert (count == 3).all() and sum(s[3] == "describe" for s in seqs) == 6
    _, _, _, (_, _, count) = td.make_batch(rng, 6, tok, shape_mix=(1, 0, 0))
    assert (count == 1).all()
    patches, grids, seqs, _ = td.make_batch(np.random.default_rng(4), 2, tok, shape_mix=(0, 1, 1))
    pad = tok.specials["[PAD]"]
    content = torch.tensor([tok.encode(" " + w)[0] for w in list(scenes.COLORS) + list(scenes.SHAPES)])
    with torch.no_grad():
        plain = td.forward_loss(model, patches, grids, seqs, pad, per_seq=True)[0]
        same = td.forward_loss(model, patches, grids, seqs, pad, per_seq=True, content_ids=content,
                               content_weight=1.0)[0]
        heavy = td.forward_loss(model, patches, grids, seqs, pad, per_seq=True, content_ids=content,
                                content_weight=5.0)[0]
        # by hand: per sequence, sum(w * loss) / sum(w) with w = 5 on content tokens, then the mean
        ids, pos, mask, labels, sid, row_img = td.pack_rows(seqs, pad)
        feats = model.encode_images(patches, grids)
        per_img = list(torch.split(feats, [(g[0] // 2) * (g[1] // 2) for g in grids]))
        h = model.hidden(ids, torch.cat([per_img[i] for i in row_img if i is not None]), pos, mask)
        m = labels != -100
        tl = torch.nn.functional.cross_entropy(model.language_model.lm_head(h[m]), labels[m], reduction="none")
        w = 1.0 + 4.0 * torch.isin(labels[m], content).float()
        want = torch.stack([(tl * w)[sid[m] == j].sum() / w[sid[m] == j].sum() for j in range(len(seqs))]).mean()
    assert torch.isclose(plain, same) and not torch.isclose(plain, heavy)
    assert torch.isclose(heavy, want, rtol=1e-5), (heavy.item(), want.item())


def test_tiny_run_exports_a_checkpoint_pykimi_loads(tmp_path):
    out = tmp_path / "demo"
    td.main(["--vision-steps", "2", "--vision-batch", "2", "--steps", "2", "--batch-images", "2",
             "--copy-drill", "2", "--eval-images", "2", "--val-every", "1000",
             "--state", str(tmp_path / "s.pt"), "--out", str(out)])
    model = pykimi.load(str(out))
    proc = pykimi.Processor.from_pretrained(str(out))
    img, _ = scenes.random_scene(np.random.default_rng(1))
    text = proc.apply_chat_template(scenes.messages_for(scenes.QUESTION_COUNT), add_generation_prompt=True)
    inputs = proc(text=text, images=[img])
    ids = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["image_grid_hws"],
                         max_new_tokens=3, temperature=0.0)
    assert 1 <= len(ids) <= 3
