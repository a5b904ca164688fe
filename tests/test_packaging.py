"""The wheel ships every package, `kernels/` as `saekit.kernels` (never a top-level `kernels`),
and the package data (model card template, registry, testbed models)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]


def _declared_packages() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return config["tool"]["setuptools"]["packages"]


def test_every_package_in_the_tree_is_declared():
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "saekit").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert sorted(found) == sorted(_declared_packages())


def test_wheel_contents(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("saekit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped_kernels = {n.rsplit("/", 1)[1] for n in names if n.startswith("saekit/kernels/")}
    assert {p.name for p in (REPO / "kernels").glob("*.py")} < shipped_kernels
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` module"
    for package in _declared_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "saekit/py.typed" in names
    assert any(n.endswith("MODEL_CARD.md") for n in names)


def _from_root(*args: str) -> subprocess.CompletedProcess:
    """Run python from the repository root, where `python -m` and `python -c` put the root first
    on sys.path."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


def test_the_kernels_folder_never_shadows_the_kernels_distribution():
    """transformers (>= 5.25) and diffusers import the `kernels` distribution; from the repository
    root, a regular package in `kernels/` would be imported in its place."""
    probe = _from_root(
        "-c",
        "import importlib.util, kernels; "
        "print(kernels.__file__); "
        "print(importlib.util.find_spec('saekit.kernels.functions').origin)",
    )
    assert probe.returncode == 0, probe.stderr
    top_level, ours = probe.stdout.split()
    assert not Path(top_level).resolve().is_relative_to(REPO), top_level
    assert Path(ours).resolve() == REPO / "kernels" / "functions.py"
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_library_imports_and_cli_work_from_the_repository_root():
    peft = _from_root("-c", "from diffusers.loaders import peft; import saekit.adapters")
    assert peft.returncode == 0, peft.stderr
    cli = _from_root("-m", "saekit", "--help")
    assert cli.returncode == 0, cli.stderr
    assert "train" in cli.stdout
