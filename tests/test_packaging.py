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
    found.add("saekit.kernels")
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
    assert "saekit/kernels/eager.py" in names
    assert not any(n.startswith("kernels/") for n in names), "no top-level `kernels` module"
    for package in _declared_packages():
        assert f"{package.replace('.', '/')}/__init__.py" in names, package
    assert "saekit/py.typed" in names
    assert any(n.endswith("MODEL_CARD.md") for n in names)
