"""Paper-style report across train.py runs and sweeps: ``python analyze.py [runs=DIR] [key=value ...]``.

Without ``runs`` it analyzes the newest run or multirun under ./outputs and ./multirun.
The report goes to this command's own Hydra run dir (``reports/<date>/<time>`` by
default; ``hydra.run.dir=...`` changes it). Options: conf/analyze.yaml, docs/analysis.md.
"""

import sys

import hydra
from omegaconf import DictConfig

from layerprobe.cli import analyze_template, check_overrides, exit_on_user_error


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from layerprobe.analysis.cli import run

    run(cfg)


if __name__ == "__main__":
    exit_on_user_error(lambda: check_overrides(sys.argv[1:], analyze_template(), "analyze.py"))  # unknown keys: one line
    main()
