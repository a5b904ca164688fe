"""``saekit pull``: a pretrained dictionary from the Hub, a known release or a local folder, written
as a saekit dictionary folder that the steering and eval commands read."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..configuration import ConfigError


@contextlib.contextmanager
def as_user_errors() -> Iterator[None]:
    """Show the hub layer's refusals (bad files, unsafe names, ...) as the CLI's one-line errors."""
    from ..hub import HubError

    try:
        yield
    except HubError as err:
        raise ConfigError(str(err)) from err


def add_source_arguments(parser: argparse.ArgumentParser, format_flag: str = "--format") -> None:
    """The flags that pick and read a pretrained dictionary (shared with `saekit export`, where
    --format names the target, so the source's format is --source_format)."""
    parser.add_argument(
        "--hookpoint",
        help="the dictionary to take from a source that holds several: its folder in the "
        "repository, or for a release the model's hookpoint (see --list)",
    )
    parser.add_argument("--revision", help="branch, tag or commit of a Hub repository")
    parser.add_argument(
        "--subfolder", help="a folder of the source under which --hookpoint is found"
    )
    parser.add_argument(
        format_flag,
        dest="source_format",
        choices=["saekit", "saelens", "sparsify", "sdxl-unbox", "prisma"],
        help="skip format detection",
    )
    parser.add_argument(
        "--weights_file", help="the weights file, for formats whose name varies (Prisma)"
    )
    parser.add_argument(
        "--allow_pickle",
        "--allow-pickle",
        action="store_true",
        help="read pickled (torch.save) weights, as sdxl-unbox and Prisma publish them, with "
        "torch.load(weights_only=True). Only for sources you trust.",
    )


def load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "revision": args.revision,
        "subfolder": args.subfolder,
        "format": args.source_format,
        "weights_file": args.weights_file,
        "allow_pickle": args.allow_pickle,
    }


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="download a pretrained dictionary (any supported format) into a saekit folder",
        description="Fetch a dictionary from a Hugging Face repository, a known release (--list) "
        "or a local folder, in saekit's, SAELens's, sparsify's, sdxl-unbox's or Prisma's format, and "
        "write it as <output_dir>/<hookpoint>/ with an index.json. Only the files the dictionary "
        "needs are downloaded; the Hugging Face cache and HF_HUB_OFFLINE are honoured.",
    )
    parser.add_argument(
        "source", nargs="?", help="release name, Hub repository id (owner/name) or folder"
    )
    add_source_arguments(parser)
    parser.add_argument(
        "--output_dir", help="where to write the dictionary (default: dictionaries/<source name>)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a dictionary already there"
    )
    parser.add_argument("--list", action="store_true", help="list the known releases and exit")
    parser.set_defaults(handler=run)


def print_releases() -> None:
    from ..hub import releases

    for release in releases().values():
        print(f"{release.name}  [{release.format}, {release.family}]  {release.model}")
        print(f"    {release.description}")
        repos = {release.repo_of(entry) for entry in release.dictionaries}
        print(
            f"    repository: {', '.join(sorted(repos)) if len(repos) < 3 else f'{len(repos)} repositories'}"
        )
        print(f"    hookpoints ({release.capture}): {', '.join(release.hookpoints)}")
        if release.unverified:
            print(f"    unverified: {', '.join(release.unverified)} ({release.notes})")


def run(args: argparse.Namespace) -> int:
    if args.list:
        print_releases()
        return 0
    if not args.source:
        raise ConfigError("give the SOURCE to pull (a release, owner/name or a folder), or --list")
    from ..hub.pull import pull

    output_dir = Path(args.output_dir or Path("dictionaries") / Path(args.source.rstrip("/")).name)
    with as_user_errors():
        pulled = pull(
            args.source,
            args.hookpoint,
            output_dir=output_dir,
            overwrite=args.overwrite,
            **load_kwargs(args),
        )
    origin = pulled.origin
    where = (
        f"{origin.repo_id}@{origin.revision[:12]}"
        if origin.repo_id and origin.revision
        else origin.source
    )
    print(
        f"{origin.library} dictionary from {where} -> {pulled.path} "
        f"({pulled.cfg.architecture}, d_in={pulled.cfg.d_in}, d_sae={pulled.cfg.d_sae}, "
        f"model={pulled.cfg.model or '?'}, hookpoint={pulled.cfg.hookpoint or '?'})"
    )
    return 0
