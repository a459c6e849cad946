"""What train.py and analyze.py share: one-line errors and checks before Hydra starts."""
from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

from layerprobe.errors import LayerprobeError

# Lightning warns about a torch pytree API it calls internally: nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CHECKED_GROUPS = ("model", "task", "probe", "extract", "similarity", "trainer", "experiment", "paths")


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    from hydra.core.config_store import ConfigStore

    names = {p.stem for p in (conf_dir / group).glob("*.yaml")}
    stored = ConfigStore.instance().repo.get(group, {})
    names |= {n.removesuffix(".yaml") for n in stored if n != "schema.yaml"}
    return sorted(names - {"schema"})


def check_group_choices(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Turn `model=typo` into one line listing the valid choices (Hydra's own message spans many)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key not in CHECKED_GROUPS or value in ("", "null"):
            continue
        options = group_options(key, conf_dir)
        for choice in value.split(","):  # -m sweeps: model=a,b
            if choice not in options:
                raise LayerprobeError(f"unknown {key} '{choice}'; valid: {', '.join(options)}")


def exit_on_user_error(fn):
    """Run fn(); a LayerprobeError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return fn()
    except LayerprobeError as err:
        logging.getLogger("layerprobe").error("%s", err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
