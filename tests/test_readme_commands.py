"""The README's two set-up commands are the ones .ci/run runs: CI checks what a new user types."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def set_up_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)][:2]


def test_ci_runs_the_readmes_demo_and_test_command() -> None:
    install, tests = set_up_commands()
    assert install.endswith("fusemerge demo") and 'pip install -e ".[test]"' in install
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci  # the very line, not one like it
    assert 'python -m pip install --quiet -e ".[test]"' in ci
    assert any(line.startswith("fusemerge demo") for line in ci)
