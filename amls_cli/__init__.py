"""`amls`: the command line, one module per command group.

Exit codes: 0 success; 1 the command ran but some of its work failed (import items, shards,
a Label Studio refusal), as each command documents; 2 bad input, settings or files, or an
unexpected failure of the run: one line "amls COMMAND: ..." on stderr (the traceback with -v).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ml_backend.core.errors import AmlsError
from ml_backend.core.progress import set_verbose

# What a command reports as "amls COMMAND: error: ..." and exit status 2: input, settings or
# files the user can fix (a missing file, a corrupt model, Label Studio unreachable...).
INPUT_ERRORS: tuple[type[BaseException], ...] = (AmlsError, ValueError, KeyError, OSError)


# Where command groups keep the name of their subcommand ("amls store info", "amls import fits").
SUBCOMMAND_DESTS = ("store_action", "import_kind", "survey_command", "versions_action")


def build_parser() -> argparse.ArgumentParser:
    from amls_cli import (
        evaluate,
        imports,
        score,
        serve,
        setup_project,
        similar,
        simulate,
        store,
        survey,
        train,
        versions,
    )

    parser = argparse.ArgumentParser(
        prog="amls",
        description="AnomalyMatch for Label Studio: find rare objects from a few labels.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging and progress bars even when not on a terminal")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (store, train, score, evaluate, simulate, imports, serve, setup_project,
                  survey, versions, similar):
        group.register(sub)
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
    if not args.verbose:
        # httpx logs every request at INFO, including the 404 that ends each paginated read
        # of Label Studio's tasks; those lines are noise unless debugging.
        logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except INPUT_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        _report_failure(args, f"error: {message}")
    except Exception as err:  # noqa: BLE001 - the run itself failed: one line, no traceback
        _report_failure(args, f"the run failed: {type(err).__name__}: {err} (rerun with -v "
                              "for the traceback)")
    return 2


def _report_failure(args: argparse.Namespace, text: str) -> None:
    logging.getLogger("amls").debug("command failed", exc_info=True)  # shown with -v
    words = [args.command, *(getattr(args, dest, None) for dest in SUBCOMMAND_DESTS)]
    print(f"amls {' '.join(w for w in words if w)}: {text}", file=sys.stderr)
