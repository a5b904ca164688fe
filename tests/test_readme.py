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


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt pins exact versions; got {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_test_command_installs_the_pinned_set():
    readme = (REPO / "README.md").read_text()
    command = re.findall(r"^(pip install .*)$", readme.split("---")[0], flags=re.MULTILINE)[1]
    assert " -c constraints.txt " in command
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    assert "torch==2.14.1 torchvision==0.29.1" in command
    assert "saekit" not in pins  # the checkout itself is installed editable, never pinned


def test_the_pins_satisfy_the_ranges_of_pyproject():
    """Every requirement of saekit and its extras is pinned, inside the range that a user
    install (command 1) resolves: the pins and the ranges cannot drift apart."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        lines += [line for line in extra if not line.startswith("saekit")]
    pins = _pins()
    for line in lines:
        requirement = Requirement(line)
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"{requirement.name} is required but not pinned in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {requirement}"
        )
