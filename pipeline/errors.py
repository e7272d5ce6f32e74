"""The one exception type that reaches users as a single line (exit code 2)."""

import sys


class UserError(Exception):
    """Bad input a user can fix: the message names the problem and the fix.

    The CLI and job entrypoints print it as one line with no traceback.
    """

    exit_code = 2

    def report(self) -> int:
        """Print the one line on stderr; return the exit code."""
        print(f"icu: error: {self}", file=sys.stderr)
        return self.exit_code
