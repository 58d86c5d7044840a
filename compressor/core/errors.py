"""One exception type for every user-facing problem.

The CLI turns a :class:`NaspruneError` into a single line (problem + fix) and a non-zero exit
code instead of a traceback; library users can catch it like any other exception.
"""


class NaspruneError(Exception):
    """A problem the user can fix; the message names the problem and the fix in one line."""
