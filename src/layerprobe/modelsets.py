"""Model sets: what a run needs to know about its models before loading them.

- `memory_estimate`: parameters x bytes per dtype, from the config alone (the model is
  built on the meta device, so nothing is allocated), logged before every load.
- `extract_settings_for`: `model.dtype` (set by the 7B/8B presets to bfloat16) overrides
  `extract.dtype`, so the dtype that enters the feature-store fingerprint is the one used.
- `check_placement`: `model.device_map` spreads one model over the visible GPUs inside one
  process, so it cannot be combined with Lightning's multi-device strategies.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from layerprobe.errors import LayerprobeError

log = logging.getLogger(__name__)

BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}
GiB = 1024**3


class PlacementError(LayerprobeError):
    """A device placement that cannot work; the message says how to fix it."""


def count_parameters(config, trust_remote_code: bool = False) -> int:
    """Parameters of the backbone `AutoModel` builds from `config`, counted on the meta device."""
    from transformers import AutoModel

    from layerprobe.backbone import quiet_transformers

    try:
        with torch.device("meta"), quiet_transformers():
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # exotic configs: the usual transformer formula is close enough for an estimate
        d = getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)
        layers = getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0)
        inner = getattr(config, "intermediate_size", None) or 4 * d
        vocab = getattr(config, "vocab_size", 0)
        return int(layers * (4 * d * d + 3 * d * inner) + vocab * d)


def memory_estimate(config, dtype: str, trust_remote_code: bool = False) -> dict:
    n = count_parameters(config, trust_remote_code)
    return {"parameters": n, "dtype": dtype, "weights_gib": n * BYTES_PER_PARAM[dtype] / GiB}


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(int(n))


def log_memory_estimate(checkpoint: str, config, dtype: str, device_map=None, trust_remote_code: bool = False) -> dict:
    est = memory_estimate(config, dtype, trust_remote_code)
    where = f"device_map={device_map}" if device_map else "one device"
    size = f"{est['weights_gib']:.1f} GiB" if est["weights_gib"] >= 1 else f"{est['weights_gib'] * 1024:.1f} MiB"
    log.info("loading '%s': %s parameters x %d bytes (%s) = about %s of weights (%s), plus activations",
             checkpoint, _count(est["parameters"]), BYTES_PER_PARAM[dtype], dtype, size, where)
    if torch.cuda.is_available() and not device_map:
        free, _ = torch.cuda.mem_get_info()
        if est["weights_gib"] * GiB > free:
            log.warning("'%s' needs about %.1f GiB but the GPU has %.1f GiB free; set model.device_map=auto to spread it "
                        "over several GPUs, or model.dtype=bfloat16", checkpoint, est["weights_gib"], free / GiB)
    return est


def extract_settings_for(model_cfg, extract_cfg):
    """The extraction settings with `model.dtype` applied (null keeps `extract.dtype`)."""
    if model_cfg.dtype and model_cfg.dtype != extract_cfg.dtype:
        return replace(extract_cfg, dtype=model_cfg.dtype)
    return extract_cfg


def check_placement(model_cfg, trainer_cfg: dict) -> None:
    devices = trainer_cfg.get("devices", 1)
    single = devices in (1, "1") or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    if model_cfg.device_map and not single:
        raise PlacementError(
            f"model.device_map={model_cfg.device_map} places each model over all visible GPUs in one process; "
            f"it cannot run with trainer.devices={devices}: set trainer.devices=1 (or drop model.device_map)"
        )
