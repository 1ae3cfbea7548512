"""Errors a user can cause (bad paths, data or configuration)."""


class UserError(Exception):
    """A mistake in the user's input: the CLI prints its message as one line and exits non-zero."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message ("" when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
