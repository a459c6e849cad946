"""One base class for every error a user can fix: train.py/analyze.py print its message
as one line and exit non-zero, without a traceback."""


class LayerprobeError(ValueError):
    """A problem with the user's input; the message names it and the fix."""
