"""``saekit push``: publish a folder of dictionaries to the Hugging Face Hub with a model card."""

from __future__ import annotations

import argparse
from typing import Any

from .pull import as_user_errors


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "push",
        help="publish dictionaries to a Hugging Face repository with a generated model card",
        description="Upload one folder per dictionary, index.json and a README.md rendered from "
        "MODEL_CARD.md. The token comes from HF_TOKEN or `hf auth login`; it is never written.",
    )
    parser.add_argument(
        "dir", help="a folder written by `saekit train` or `saekit pull`, or one dictionary"
    )
    parser.add_argument("repo", help="the Hub repository (owner/name); created if missing")
    parser.add_argument(
        "--dry_run",
        "--dry-run",
        metavar="OUT",
        help="write the exact files that would be uploaded to OUT and upload nothing",
    )
    parser.add_argument("--revision", help="an existing branch to commit to (default: main)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--commit_message", help="message of the upload commit")
    parser.add_argument(
        "--eval_report",
        help="a JSON report of `saekit eval` whose metrics go in the model card (an eval.json in a "
        "dictionary's folder is used too)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..hub.push import push

    with as_user_errors():
        result = push(
            args.dir,
            args.repo,
            dry_run=args.dry_run,
            revision=args.revision,
            private=args.private,
            commit_message=args.commit_message,
            eval_report=args.eval_report,
        )
    listing = "\n".join(f"  {name}" for name in result.files)
    if result.dry_run_dir is not None:
        print(
            f"dry run: {len(result.files)} files for {result.repo_id} written to {result.dry_run_dir}:\n{listing}"
        )
    else:
        print(
            f"uploaded {len(result.files)} files to {result.repo_id}: {result.commit_url}\n{listing}"
        )
    return 0
