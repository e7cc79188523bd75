"""User-facing errors. The CLI turns any `QServeError` into one readable line and exit code 2."""

from __future__ import annotations


class QServeError(ValueError):
    """Bad input from a user: a model directory, a flag, a request. The message is the whole story;
    ``param`` names the request field at fault, where there is one (the HTTP error's ``param``)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnsupportedModelError(QServeError):
    """The checkpoint's architecture, dtype or layout is not one qserve runs."""
