"""Errors every part may raise and the command line turns into one line and an exit code.

Kept free of heavy imports: `batchd jobs` must not pay for the HTTP client.
"""

from __future__ import annotations


class StartupError(Exception):
    """Something the operator must fix before the daemon can start (one line)."""
