"""The one exception type users see: a single line that says what is wrong and what to do."""


class MoemergeError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
