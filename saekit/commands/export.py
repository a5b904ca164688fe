"""``saekit export --format saelens``: write dictionaries in another library's layout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .pull import add_source_arguments, as_user_errors, load_kwargs


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write dictionaries in SAELens's format",
        description="Convert dictionaries (a saekit folder, or any source `saekit pull` reads) to "
        "SAELens's layout (cfg.json + sae_weights.safetensors), one folder per dictionary, "
        "loadable with sae_lens.SAE.load_from_disk.",
    )
    parser.add_argument(
        "source", help="a saekit folder (all its dictionaries), a release or owner/name"
    )
    parser.add_argument("--format", dest="target_format", choices=["saelens"], required=True)
    parser.add_argument("--output_dir", required=True, help="where the exported folders go")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace exported files already there"
    )
    add_source_arguments(parser, format_flag="--source_format")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..dictionaries.io import INDEX_FILE
    from ..hub import load_pretrained
    from ..hub.export import export_saelens
    from ..hub.pull import folder_name
    from ..hub.push import dictionary_folders

    out = Path(args.output_dir)
    source = Path(args.source)
    with as_user_errors():
        if (
            source.is_dir()
            and (source / INDEX_FILE).is_file()
            and not (args.hookpoint or args.subfolder)
        ):
            sources = [str(folder) for folder in dictionary_folders(source).values()]
        else:
            sources = [args.source]
        for item in sources:
            hookpoint = args.hookpoint if item == args.source else None
            pretrained = load_pretrained(item, hookpoint, **load_kwargs(args))
            target = export_saelens(
                pretrained.sae, out / folder_name(pretrained), overwrite=args.overwrite
            )
            print(f"{item} -> {target} (SAELens {pretrained.sae.cfg.architecture})")
    return 0
