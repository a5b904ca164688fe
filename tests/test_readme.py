"""The README holds: CI runs its test command and nothing else, that command installs the
pinned set, and its Python snippets run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


_SNIPPET = re.compile(
    r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S
)


def _snippets() -> list[tuple[int, str | None, str]]:
    """``(line, mark, code)`` of every Python block of the README; ``mark`` is the reason an
    HTML comment right above it gives for not running it (None: it runs)."""
    readme = (REPO / "README.md").read_text()
    return [
        (readme[: m.start("code")].count("\n"), m.group("mark"), m.group("code"))
        for m in _SNIPPET.finditer(readme)
    ]


def test_every_readme_snippet_compiles_and_says_why_it_is_not_run():
    snippets = _snippets()
    assert snippets
    for line, mark, code in snippets:
        compile(code, f"README.md:{line}", "exec")
        assert mark is None or mark.startswith(("fragment (", "needs the Hub", "needs a GPU")), (
            f"README.md:{line}: a snippet that is not run says why: fragment (what the reader "
            "brings), needs the Hub or needs a GPU"
        )


def test_the_readme_snippets_run_as_written_from_the_repository_root():
    """The runnable blocks, top to bottom in one interpreter as a reader would paste them, from
    the repository root (where the top-level ``kernels/`` folder must shadow nothing)."""
    runnable = [(line, code) for line, mark, code in _snippets() if mark is None]
    assert len(runnable) >= 2
    script = "\n".join(
        f"print('--- README.md:{line}', flush=True)\n{code}" for line, code in runnable
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert run.stdout.count("--- README.md:") == len(runnable)
