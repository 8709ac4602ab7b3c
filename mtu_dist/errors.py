"""User-facing errors.

Anything the user can fix (a bad file, a typo, a missing shard) raises `UserError`; the CLI prints
its message and exits non-zero without a traceback. Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by input the user controls; the message names the file/key/field."""
