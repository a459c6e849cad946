"""Model roles: what a run needs to know about its models before loading them.

- `extract_settings_for`: `model.dtype` (set by the 7B/8B presets to bfloat16) overrides
  `extract.dtype`, so the dtype that enters the feature-store fingerprint is the one used.
- `check_placement`: `model.device_map` spreads one model over the visible GPUs inside one
  process, so it cannot be combined with Lightning's multi-device strategies.
"""
from __future__ import annotations

from dataclasses import replace

from layerprobe.errors import LayerprobeError


class PlacementError(LayerprobeError):
    """A device placement that cannot work; the message says how to fix it."""


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


# --- control models (MOSSA) -----------------------------------------------------------------

CONTROL_PREFIX = "control:"


class ControlError(LayerprobeError):
    """A control model that cannot be used; the message names the task, the checkpoint and the fix."""


def control_role(task: str) -> str:
    return CONTROL_PREFIX + task


def control_task(role: str) -> str | None:
    return role[len(CONTROL_PREFIX):] if role.startswith(CONTROL_PREFIX) else None


def check_controls(controls: dict, task_names: list[str]) -> None:
    """Fails on a control for a task that is not in the run, or a control path that does not exist."""
    from layerprobe.models.load import is_local, looks_like_path

    for task, checkpoint in (controls or {}).items():
        if task not in task_names:
            raise ControlError(f"model.controls.{task}: task '{task}' is not in this run (tasks: {', '.join(task_names)}); "
                               f"add it to task.tasks or drop the control")
        if not checkpoint:
            raise ControlError(f"model.controls.{task} is empty; give a checkpoint dir, hub id or LoRA adapter dir")
        if not is_local(str(checkpoint)) and looks_like_path(str(checkpoint)):
            raise ControlError(f"model.controls.{task}: control dir does not exist: {checkpoint}; "
                               f"fix model.controls.{task}=<existing checkpoint dir, hub id or LoRA adapter dir>")


def _same_weights(a: dict, b: dict) -> bool:
    if a.get("kind") == "local" and b.get("kind") == "local":
        return a.get("content") == b.get("content")
    if a.get("kind") == "hub" and b.get("kind") == "hub":
        return a.get("id") == b.get("id") and a.get("commit") == b.get("commit")
    return False


def read_adapter_file(task: str, root, name: str) -> dict:
    """A JSON file of a control's adapter dir; an unreadable or cut-off one is one ControlError line."""
    import json

    try:
        return json.loads((root / name).read_text())
    except (OSError, ValueError) as e:
        raise ControlError(f"model.controls.{task}: cannot read {root / name} ({e.__class__.__name__}: {e}); "
                           f"fix or re-create the adapter dir, or give a merged checkpoint") from None


def check_adapter_base(task: str, adapter_dir: str, base: str, base_identity: dict, revision=None) -> None:
    """A LoRA control must be an adapter of this run's base model."""
    from pathlib import Path

    from layerprobe.models.load import checkpoint_identity, is_local

    root = Path(adapter_dir).expanduser()
    made_for = None
    if (root / "manifest.json").exists():  # made by layerprobe's tuning stage: it recorded the base's identity
        meta = read_adapter_file(task, root, "manifest.json")
        if meta.get("kind") == "layerprobe-model" and "base" in meta:
            if _same_weights(meta["base"], base_identity):
                return
            made_for = meta.get("base_checkpoint") or meta["base"].get("path") or meta["base"].get("id")
    if made_for is None:
        config = read_adapter_file(task, root, "adapter_config.json")
        declared = config.get("base_model_name_or_path")
        if not declared or declared == base:
            return
        if is_local(declared):
            if _same_weights(checkpoint_identity(declared), base_identity):
                return
        elif is_local(base):
            return  # a hub id against a local base: cannot tell here; loading checks the shapes
        made_for = declared
    raise ControlError(f"model.controls.{task}: the LoRA adapter {adapter_dir} was made for another base model "
                       f"({made_for}), not this run's base ({base}); train it from {base} or give a merged checkpoint")


def check_same_family(task: str, control: str, base: str, revision=None, trust_remote_code: bool = False,
                      control_tokenizer: str | None = None) -> None:
    """A full-checkpoint control must share the base's architecture and tokenizer (name both when not)."""
    from transformers import AutoConfig

    from layerprobe.models.prompting import load_tokenizer, vocab_hash

    kwargs = {"trust_remote_code": trust_remote_code}
    try:
        cb = AutoConfig.from_pretrained(base, revision=revision, **kwargs)
        cc = AutoConfig.from_pretrained(control, **kwargs)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ControlError(f"model.controls.{task}: cannot read the config of {control}: {first}") from err

    def shape(c):
        return (c.model_type, getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None))

    if shape(cb) != shape(cc):
        raise ControlError(f"model.controls.{task}: the control {control} is a {shape(cc)[0]} model with hidden size "
                           f"{shape(cc)[1]} and {shape(cc)[2]} layers, the base {base} a {shape(cb)[0]} with {shape(cb)[1]} and "
                           f"{shape(cb)[2]}; a control must be fine-tuned from the base")
    tb = load_tokenizer(base, trust_remote_code, revision)
    tc = load_tokenizer(control_tokenizer or control, trust_remote_code)
    if vocab_hash(tb) != vocab_hash(tc):
        raise ControlError(f"model.controls.{task}: the tokenizer of the control {control_tokenizer or control} differs from "
                           f"that of the base {base}; a control must keep the base's tokenizer")
