"""Exceptions the analysis raises for problems a user can fix.

Each message is one line that says what is wrong and what to do; ``analyze.py`` turns
them into ``error: <message>`` and a non-zero exit status instead of a traceback.
"""


from layerprobe.errors import LayerprobeError


class AnalysisError(LayerprobeError):
    """A problem with the analysis inputs or options, reported as one line."""


class ConfigError(AnalysisError, ValueError):
    """An invalid analysis option (names the field and the fix)."""


class NoResultsError(AnalysisError):
    """An input directory holds no ``probes.csv`` / ``similarity.csv``."""
