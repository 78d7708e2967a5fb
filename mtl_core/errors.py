"""The one exception family the command line turns into a clear message instead of a traceback."""


class MtlError(Exception):
    """A problem the user can fix; the message says what is wrong, where, and what to do."""
