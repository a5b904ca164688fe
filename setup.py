"""Ships the repository's top-level ``kernels/`` folder inside the wheel as ``saekit.kernels``.

``kernels/`` has no ``__init__.py`` (a regular package there would shadow the unrelated
``kernels`` distribution whenever the repository root is on ``sys.path``), so setuptools cannot
map it as a package; the package ``saekit.kernels`` (``saekit/kernels/__init__.py``) takes its
modules instead. Everything else is declared in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

KERNELS = Path(__file__).parent / "kernels"


class BuildPyWithKernels(build_py):
    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "saekit.kernels":
            modules += [
                (package, path.stem, str(path.relative_to(Path(__file__).parent)))
                for path in sorted(KERNELS.glob("*.py"))
            ]
        return modules


setup(cmdclass={"build_py": BuildPyWithKernels})
