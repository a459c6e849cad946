"""Compare a base model with its instruction-tuned version, layer by layer.

    python train.py                                   # offline demo
    python train.py model=smollm2 task=sentiment probe=mlp 'probe.layers=[4,8]'
    python train.py -m task=sentiment,topic seed=0,1  # Hydra sweep
See README.md for every option.
"""
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from layerprobe.cli import check_group_choices, check_overrides, exit_on_user_error, quiet_console, train_template
from layerprobe.config import register_configs
from layerprobe.distributed import check_sweep_argv, rank_zero_reports

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from layerprobe.pipeline import run

    quiet_console()  # Lightning's per-Trainer banners: once per process, through Hydra's handlers only
    # ranks > 0 of a multi-device run re-run this command; rank 0 alone reports user errors
    exit_on_user_error(lambda: rank_zero_reports(lambda: run(cfg, Path(HydraConfig.get().runtime.output_dir))))


if __name__ == "__main__":
    exit_on_user_error(lambda: check_group_choices(sys.argv[1:]))
    exit_on_user_error(lambda: check_overrides(sys.argv[1:], train_template()))  # unknown keys, wrong types: one line
    exit_on_user_error(lambda: check_sweep_argv(sys.argv[1:]))  # -m with devices > 1: see docs/scaling.md
    main()
