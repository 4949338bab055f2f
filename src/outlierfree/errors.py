"""The one exception type that the CLI turns into a one-line error.

Every check on user input raises :class:`OutlierfreeError` with a message that names the problem *and* the fix,
so that ``outlierfree`` can print it on one line and exit non-zero without a traceback.
"""

from __future__ import annotations


class OutlierfreeError(Exception):
    """A user-facing error: bad flag, bad file, unsupported model. The message names problem and fix."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}; {fix}" if fix else problem)


def require(condition: bool, problem: str, fix: str | None = None) -> None:
    """Raise :class:`OutlierfreeError` with ``problem`` and ``fix`` unless ``condition`` holds."""
    if not condition:
        raise OutlierfreeError(problem, fix)
