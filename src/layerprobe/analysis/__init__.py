"""Reports across train.py runs and sweeps: tables, figures and the layer sections.

Library entry point (train.py calls it at the end of a run)::

    from layerprobe.analysis import write_report
    result = write_report([run_dir], run_dir / "report")

``python analyze.py`` is the command-line front end (see docs/analysis.md).
"""

from .config import AnalysisConfig
from .errors import AnalysisError, ConfigError, NoResultsError
from .load import find_latest_run, load_runs
from .report import write_report
from .sections import SectionFit, detect_sections, fit_sections

__all__ = [
    "AnalysisConfig",
    "AnalysisError",
    "ConfigError",
    "NoResultsError",
    "SectionFit",
    "detect_sections",
    "find_latest_run",
    "fit_sections",
    "load_runs",
    "write_report",
]
