"""The one error type for problems a user can fix."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can act on: printed as one paragraph, no traceback, exit 1.

    `message` says what is wrong, `hint` says how to fix it.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message
