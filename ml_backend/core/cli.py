"""The core's subcommands: store build, train, score, evaluate, simulate."""

from __future__ import annotations

import argparse

from ml_backend.core import cli_evaluate, cli_score, cli_simulate, cli_store, cli_train


def register(sub: argparse._SubParsersAction) -> None:
    """Add the core's subcommands to the `amls` parser."""
    for module in (cli_store, cli_train, cli_score, cli_evaluate, cli_simulate):
        module.register(sub)
