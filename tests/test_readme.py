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


def test_ci_is_a_newcomer():
    """.ci/run installs nothing into its venv before the README's first command (no pip upgrade, no reference
    tools): a missing install step must fail CI, not hide in it (issue 17). The reference tools come after the
    README's test command, followed by only the tests marked `reference`."""
    _, cmds = readme_commands()
    ci = [ln.strip() for ln in open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()]
    ci = [ln for ln in ci if ln and not ln.startswith("#")]
    venv_at = ci.index("python3 -m venv .venv")
    first, second = ci.index(cmds[0]), ci.index(cmds[1])
    assert venv_at < first < second
    between = [ln for ln in ci[venv_at + 1:first] if re.search(r"\bpip\b|\bsetup\.py\b|\buv\b", ln)]
    assert not between, f".ci/run installs before the README's first command: {between}"
    after = ci[second + 1:]
    assert any("-m reference" in ln and "pytest" in ln for ln in after), "reference tests are not re-run after the tools"


def test_readme_states_python_versions():
    text, _ = readme_commands()
    assert re.search(r"Python 3\.10[^\n]*3\.13", text), "README does not state the supported Python versions"
