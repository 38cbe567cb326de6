"""The page's files: present in the package, every element the browser test needs, nothing fetched from
outside the serving machine, and no API that would parse model or user text as HTML."""
from __future__ import annotations

import os
import re

STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pykimi", "server", "static")
TESTIDS = ["prompt", "image-input", "send", "stop", "answer", "inspector", "routing-heatmap", "attention-map",
           "top-tokens"]


def _read(name: str) -> str:
    with open(os.path.join(STATIC, name), encoding="utf-8") as f:
        return f.read()


def test_page_files_and_testids():
    html, js = _read("index.html"), _read("app.js")
    for t in TESTIDS:
        # "answer" is moved by app.js onto the newest answer; the others are in the HTML
        where = js if t == "answer" else html
        assert f'"{t}"' in where, f"data-testid {t!r} is missing"
    assert '<script src="app.js"></script>' in html and 'href="style.css"' in html


def test_page_works_offline():
    for name in ("index.html", "app.js", "style.css"):
        text = _read(name)
        urls = re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}", text)
        assert not urls, f"{name} refers to another host: {urls}"
        assert "@import" not in text and "@font-face" not in text, name


def test_page_never_parses_text_as_html():
    js = _read("app.js")
    for api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert api not in js, f"app.js uses {api}"
    assert "textContent" in js
