"""The project's error base: what a command reports as one line and exit status 2."""

from __future__ import annotations


class AmlsError(Exception):
    """Bad input, configuration or files that the user can fix; the message says how."""
