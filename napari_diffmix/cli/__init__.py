"""The ``diffmix`` command.

Each subcommand lives in its own module under ``napari_diffmix.cli`` and exposes
``register(subparsers)`` (adds its parser and sets ``func``). Heavy imports (torch, zarr)
happen inside the command functions so ``diffmix --help`` stays fast. Errors derived from
:class:`napari_diffmix.errors.DiffMixError` are printed as one clear line (exit code 2);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .. import __version__
from ..errors import DiffMixError

# Order here is the order in ``diffmix --help``.
COMMAND_MODULES = (
    "demo",
    "stats",
    "labels",
    "train",
    "distill",
    "synthesize",
    "score",
    "report",
    "render",
    "export",
    "verify",
    "evaluate",
    "segmentation",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffmix",
        description="DiffMix: balance rare nuclei classes with synthetic label maps and diffusion-rendered H&E tissue.",
    )
    parser.add_argument("--version", action="version", version=f"napari-diffmix {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}._{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        result = args.func(args)
    except DiffMixError as exc:
        print(f"diffmix {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffmix {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
