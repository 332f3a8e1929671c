"""The one base class for errors a user can fix: the CLI prints their message as one line, no traceback."""


class CfrhError(Exception):
    """Bad input or state the user can fix; the message names the file and the fix."""
