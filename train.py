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

from layerprobe.cli import check_group_choices, exit_on_user_error
from layerprobe.config import register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from layerprobe.pipeline import run

    exit_on_user_error(lambda: run(cfg, Path(HydraConfig.get().runtime.output_dir)))


if __name__ == "__main__":
    exit_on_user_error(lambda: check_group_choices(sys.argv[1:]))
    main()
