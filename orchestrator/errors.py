"""Errors a user can fix. The CLI prints their message (no traceback) and exits non-zero."""


class UserError(Exception):
    """A mistake in the user's input or environment: the message says what and where."""


class SpecError(UserError):
    """An invalid arms spec: the message names the file, the field or line, and what was expected."""
