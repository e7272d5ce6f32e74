"""The one exception type that reaches users as a single line (exit code 2)."""


class UserError(Exception):
    """Bad input a user can fix: the message names the problem and the fix.

    The CLI and job entrypoints print it as one line with no traceback.
    """

    exit_code = 2
