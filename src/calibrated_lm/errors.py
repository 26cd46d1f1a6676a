"""The exception that carries a user-facing sentence to the command line."""

from __future__ import annotations


class UserError(ValueError):
    """A failure the user caused and can fix (bad file, unknown task, missing model).

    The CLI prints ``error: <message>`` and exits with status 2, without a
    traceback. Subclassing ``ValueError`` keeps library callers' ``except
    ValueError`` working.
    """
