"""The one exception type for problems the user can fix (bad file, bad flag).

cli.py turns it into one line on stderr and exit status 1; anything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line, exit status 1."""
