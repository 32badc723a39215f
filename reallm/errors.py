"""User-facing errors.

Anything the user can fix (a config key, a dataset line, a plan field) raises ``UserError``.
Entry points catch it and print one short paragraph instead of a traceback, then exit with code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable


class UserError(ValueError):
    """An error in the user's input; the message says where and what to do."""


class PlanError(UserError):
    """A plan.json (or a placement) that fails validation; carries every problem at once."""

    def __init__(self, problems: Iterable[str], source: str = "plan"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class NotAvailableYet(UserError):
    """A feature whose issue has not landed yet."""


def exit_on_user_error(fn):
    """Decorator for CLI mains: a UserError becomes `error: ...` on stderr and exit code 2."""

    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped
