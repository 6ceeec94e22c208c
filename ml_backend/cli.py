"""`amls`: the command line. Each room registers its own subcommands."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ml_backend.core.progress import set_verbose


def build_parser() -> argparse.ArgumentParser:
    from import_tools import cli as import_cli
    from ml_backend import project_setup, server_cli, survey_cli
    from ml_backend.core import cli as core_cli

    parser = argparse.ArgumentParser(
        prog="amls",
        description="AnomalyMatch for Label Studio: find rare objects from a few labels.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and progress bars even when not on a terminal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    core_cli.register(sub)
    import_cli.register(sub)
    server_cli.register(sub)
    project_setup.register(sub)
    survey_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    set_verbose(args.verbose)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, IsADirectoryError) as exc:
        # Bad input: one clear line, no traceback (use -v for the traceback).
        logging.getLogger("amls").error("%s", exc, exc_info=args.verbose)
        return 2


if __name__ == "__main__":
    sys.exit(main())
