"""README.md opens with exactly two commands for a fresh machine, and .ci/run runs both verbatim."""
import os
import re

from conftest import ROOT


def readme_commands():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md has no code block"
    cmds = [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return text, cmds


def test_two_commands_first():
    text, cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert "pip install" in cmds[0] and "pykimi run" in cmds[0]
    assert "pytest" in cmds[1]
    # the block comes before any other section
    assert text.index("```") < text.index("\n## ")


def test_ci_runs_the_readme_commands():
    _, cmds = readme_commands()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    for c in cmds:
        assert c in [ln.strip() for ln in ci], f".ci/run does not run the README command {c!r}"
