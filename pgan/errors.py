"""Errors a user can cause (bad paths, data or configuration)."""


class UserError(Exception):
    """A mistake in the user's input: the CLI prints its message as one line and exits non-zero."""
