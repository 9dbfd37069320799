"""The one exception type the CLI turns into a one-line message and exit code 2 (no traceback)."""


class EvlpError(Exception):
    """A problem with the user's input: what was wrong, what was expected, what to do."""
