"""The one error type users see: a single line, exit status 2, no traceback."""


class UserError(Exception):
    """Bad input from the user (a path, a config, a model); the CLI prints it as one line and exits 2."""
