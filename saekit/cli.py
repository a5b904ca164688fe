"""The ``saekit`` command line: one subcommand per stage of the data path."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from . import __version__, _dist
from ._optional import MissingDependencyError
from .configuration import ConfigError
from .hub.errors import HubError
from .sources import DataError
from .training.distributed import PeerLostError
from .training.trainer import NonFiniteError

# Subcommand modules under saekit.commands, in the order `saekit --help` lists them.
COMMANDS = [
    "cache",
    "train",
    "eval",
    "dashboard",
    "demo",
    "steer",
    "unlearn",
    "pull",
    "push",
    "export",
]

# Errors that mean "the input or the settings are wrong": shown as one clear line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    DataError,
    MissingDependencyError,
    FileExistsError,
    FileNotFoundError,
    PermissionError,
    PeerLostError,
    HubError,
    NonFiniteError,  # nan_policy=stop: the data is bad; the Python API still raises it
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="saekit",
        description="Sparse autoencoders for multimodal models: cache, train, share, steer, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"saekit {__version__}")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"saekit.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as err:
        if args.debug:
            raise
        print(f"saekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"saekit {args.command}: interrupted; complete checkpoints and files are intact",
            file=sys.stderr,
        )
        return 130


def run() -> None:
    """The ``saekit`` executable (and ``python -m saekit``): :func:`main`, then the exit that
    suits the process: a torchrun rank that joined a process group must not go through
    interpreter finalization (see :mod:`saekit._dist`). Call :func:`main` to stay in-process."""
    _dist.exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    run()
