"""`amls` subcommand (not yet implemented)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this subcommand to the `amls` parser."""
