"""Write ``constraints.txt``: the exact versions of everything ``saekit[all,test]`` pulls in,
read from the environment this script runs in (``make constraints``).

Why: an unpinned install takes the newest release of every dependency, and one release can turn
CI red overnight (transformers 5.25 made ``kernels`` a requirement; 5.24 renamed the generation
cache's keyword). CI and the README's test command install with ``-c constraints.txt``, so they
run the set that passed here; ``make test-latest`` tries the newest releases, and once they pass,
``make constraints PYTHON=.venv-latest/bin/python`` moves the pins to them.

Only the dependency closure of saekit's requirements and the extras named below is written
(like ``pip freeze --exclude-editable``, without whatever else the environment holds), walking
each installed distribution's own requirements with their environment markers and extras.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

HEADER = """\
# The tested set of every dependency of saekit[{extras}] (Python {python}, Linux).
# CI and the README's test command install with `-c constraints.txt`; pyproject.toml keeps the
# ranges a user install resolves. Refresh: `make test-latest`, then
# `make constraints PYTHON=.venv-latest/bin/python` (scripts/freeze_constraints.py).
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_requirements(extras: list[str]) -> list[Requirement]:
    """saekit's requirements and those of ``extras`` (self-references expanded), from
    pyproject.toml, so the list is the checkout's even when another saekit is installed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    wanted, seen = list(extras), set()
    requirements = [Requirement(r) for r in project["dependencies"]]
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (extras: {sorted(optional)})")
        seen.add(extra)
        for line in optional[extra]:
            requirement = Requirement(line)
            if _canonical(requirement.name) == _canonical(project["name"]):
                wanted.extend(requirement.extras)
            else:
                requirements.append(requirement)
    return requirements


def closure(requirements: list[Requirement]) -> dict[str, str]:
    """``name -> installed version`` of every distribution the requirements reach."""
    pinned: dict[str, str] = {}
    done: set[tuple[str, frozenset[str]]] = set()
    queue = [(r, "") for r in requirements]
    while queue:
        requirement, extra = queue.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
            continue
        key = (_canonical(requirement.name), frozenset(requirement.extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(
                f"{requirement} is required but not installed here: install saekit[all,test] "
                "into this environment first"
            ) from None
        pinned[_canonical(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            child = Requirement(line)
            for wanted in ("", *sorted(requirement.extras)):
                if child.marker is None or child.marker.evaluate({"extra": wanted}):
                    queue.append((child, wanted))
                    break
    return pinned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extras", default="all,test", help="extras to pin (comma-separated)")
    parser.add_argument("--output", default=str(REPO / "constraints.txt"), help="'-' for stdout")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    pinned = closure(_project_requirements(extras))
    python = ".".join(map(str, sys.version_info[:2]))
    text = HEADER.format(extras=",".join(extras), python=python)
    text += "".join(f"{name}=={pinned[name]}\n" for name in sorted(pinned))
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {len(pinned)} pins to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
