"""What ``python analyze.py`` runs: resolve the inputs, write the report, print a summary."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .config import AnalysisConfig
from .load import find_latest_run
from .report import write_report


def run(cfg: DictConfig) -> dict:
    """Analyze ``cfg.runs`` (or the latest run) into the Hydra run dir.

    An :class:`AnalysisError` (bad option value, no results, ...) becomes ``error: <message>``
    on stderr and exit status 2, as for train.py's user errors (layerprobe.cli.exit_on_user_error).
    """
    from layerprobe.cli import exit_on_user_error

    return exit_on_user_error(lambda: _run(cfg))


def _run(cfg: DictConfig) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path

    options = AnalysisConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    if options.runs:
        run_dirs = [Path(to_absolute_path(r)) for r in options.runs]
    else:
        run_dirs = [find_latest_run([Path(to_absolute_path(r)) for r in options.search_roots])]
    result = write_report(run_dirs, out_dir, options)
    _print_summary(run_dirs, result)
    return result


def _print_summary(run_dirs: list[Path], result: dict) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"analyzed {', '.join(str(p) for p in run_dirs)}")
    sections = result["sections"]
    if sections.get("shared") is not None:
        ci = sections["ci"]
        parts = []
        for name, key in (("shared", None), ("transition", "transition_start"), ("refinement", "refinement_start")):
            lo, hi = sections[name]
            band = f" (start {ci[key][0]}–{ci[key][1]})" if key and key in ci else ""
            parts.append(f"{name} {lo}–{hi}{band}")
        console.print("sections: " + ", ".join(parts) + f"  [signal: {sections['signal_description']}]")
    else:
        console.print(f"sections: not fitted ({sections.get('reason')})")
    for line in result["missing_jobs"][:10]:
        console.print(f"[yellow]missing job:[/yellow] {line}")
    if len(result["missing_jobs"]) > 10:
        console.print(f"[yellow]… and {len(result['missing_jobs']) - 10} more missing jobs (listed in the report)[/yellow]")
    console.print(f"report: {result['report_html']}")
