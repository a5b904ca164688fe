"""CI runs the README's test command and nothing else: keep the two identical."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"^(pip install .*)$", readme.split("---")[0], flags=re.MULTILINE)
    assert len(commands) == 2, "the first screen gives exactly two set-up commands"
    ci_lines = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci_lines == [commands[1]]
    assert commands[0].endswith("saekit demo")
