"""The one exception type for user mistakes (bad image, mask, parameter or path).

The CLI turns it into a single ``error: ...`` line and a non-zero exit; everything else is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user passed in; its message names the offending thing."""
