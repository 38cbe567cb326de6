"""README "Map of the code" stays true: every `pykimi/file.py:name` it lists imports, and every fast twin it
names is the one kernels.fast() returns for the definition on the same row."""
import importlib
import os
import re

from conftest import ROOT

from pykimi import kernels


def _rows():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text.split("## Map of the code", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("|") and "---" not in ln][1:]   # skip the header
    assert len(rows) >= 15, "README: the map of the code lost its rows"
    return [[re.findall(r"`(pykimi/[\w/]+\.py):(\w+)`", cell) for cell in row.strip("|").split("|")[1:]]
            for row in rows]


def _resolve(path, name):
    mod = importlib.import_module(path[:-3].replace("/", "."))
    assert hasattr(mod, name), f"README map: {path} has no {name}"
    return getattr(mod, name)


def test_every_listed_name_imports():
    n = 0
    for defs, twins in _rows():
        for path, name in defs + twins:
            _resolve(path, name)
            n += 1
    assert n >= 40, n


def test_listed_twins_are_the_registered_ones():
    registered = kernels.twins()                          # {definition: twin}, both "module.function"
    listed = 0
    for defs, twins in _rows():
        if not twins or not twins[0][0].startswith("pykimi/kernels/fused.py"):
            continue
        names = {f"{p[:-3].replace('/', '.')}.{n}" for p, n in twins}
        for path, name in defs:
            key = f"{path[:-3].replace('/', '.')}.{name}"
            if key in registered:
                assert registered[key] in names, f"README map: {key}'s twin is {registered[key]}, not {names}"
                listed += 1
    assert listed == len(registered), f"README map lists {listed} of the {len(registered)} twins {sorted(registered)}"
