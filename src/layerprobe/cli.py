"""What train.py and analyze.py share: one-line errors, checks before Hydra starts, a quiet console.

Before Hydra composes the config, the command line is checked against the typed schemas
(layerprobe.config) with the same OmegaConf machinery Hydra uses, so a typo or a bad value
is one line that names the key and the fix, instead of Hydra's multi-line report:

    error: unknown key 'probe.layer'; valid probe keys: batch_size, control, ... (did you mean probe.layers?)
    error: seed=abc is not valid: Value 'abc' of type 'str' could not be converted to Integer; give an integer, e.g. seed=0
"""
from __future__ import annotations

import difflib
import logging
import sys
import warnings
from pathlib import Path

from layerprobe.errors import LayerprobeError

# Lightning warns about a torch pytree API it calls internally: nothing a user can act on.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
CHECKED_GROUPS = ("model", "task", "probe", "extract", "similarity", "trainer", "experiment", "paths")


class UsageError(LayerprobeError):
    """A bad command-line override: an unknown key, a value of the wrong type, a syntax error."""


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


# --- keys and value types of command-line overrides ------------------------------------------


def _config_groups(conf_dir: Path) -> set[str]:
    from hydra.core.config_store import ConfigStore

    return {p.name for p in conf_dir.iterdir() if p.is_dir()} | set(ConfigStore.instance().repo) | {"hydra"}


def train_template(conf_dir: Path = CONF_DIR):
    """Every key train.py accepts, typed as Hydra types it: the group schemas registered in
    Hydra's ConfigStore (layerprobe.config.register_configs), the root keys of train.yaml
    with their TrainConfig types, and `trainer` as a free dict (Lightning checks it)."""
    import dataclasses
    import typing

    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    from layerprobe.config import GROUP_SCHEMAS, TrainConfig

    repo = ConfigStore.instance().repo
    nodes = {}
    for group in GROUP_SCHEMAS:
        stored = repo.get(group, {}).get("schema.yaml")
        nodes[group] = stored.node if stored is not None else OmegaConf.structured(GROUP_SCHEMAS[group])
    hints = typing.get_type_hints(TrainConfig)
    root_yaml = OmegaConf.load(conf_dir / "train.yaml")
    scalars = [f for f in dataclasses.fields(TrainConfig) if f.name not in nodes and f.name != "trainer"]
    extra = [k for k in root_yaml if k not in ("defaults", "hydra") and k not in hints]
    root_type = dataclasses.make_dataclass(
        "TrainRoot", [(f.name, hints[f.name], dataclasses.field(default=root_yaml.get(f.name, f.default))) for f in scalars]
        + [(k, typing.Any, dataclasses.field(default=root_yaml[k])) for k in extra])
    cfg = OmegaConf.structured(root_type)
    OmegaConf.set_struct(cfg, False)
    for group, node in nodes.items():
        cfg[group] = node
    cfg.trainer = {}
    OmegaConf.set_struct(cfg, True)
    OmegaConf.set_struct(cfg.trainer, False)
    return cfg


def analyze_template(conf_dir: Path = CONF_DIR):
    """The keys analyze.py accepts: those of conf/analyze.yaml (AnalysisConfig checks the values)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(conf_dir / "analyze.yaml")
    for key in ("defaults", "hydra"):
        cfg.pop(key, None)
    OmegaConf.set_struct(cfg, True)
    return cfg


def _describe_type(node, key: str) -> str:
    """'an integer, e.g. seed=0': the expected kind of value, with the default as the example."""
    import json

    from omegaconf import DictConfig, ListConfig, OmegaConf
    from omegaconf.nodes import BooleanNode, FloatNode, IntegerNode, StringNode

    kinds = [(BooleanNode, "true or false"), (IntegerNode, "an integer"), (FloatNode, "a number"), (StringNode, "a string"),
             (ListConfig, "a list"), (DictConfig, "a mapping")]
    kind = next((k for t, k in kinds if isinstance(node, t)), "another value")
    try:
        if OmegaConf.is_config(node):
            default = None if node._is_none() else json.dumps(OmegaConf.to_container(node), separators=(",", ":"))
        else:
            default = node._value()
            default = None if default is None else json.dumps(default) if isinstance(default, bool) else str(default)
    except Exception:  # an interpolation or ???: no example from the default
        default = None
    if default is None or "${" in default or default == "???":
        default = {"a list": "[...]", "a mapping": "{...}"}.get(kind)
    return f"{kind}, e.g. {key}={default}" if default is not None and len(default) < 60 else kind


def _walk(cfg, parts: list[str]):
    """The deepest existing node on the path `parts` and how many parts it covers."""
    from omegaconf import DictConfig

    node, depth = cfg, 0
    for part in parts:
        if not isinstance(node, DictConfig) or part not in node:
            break
        node = node._get_node(part)
        depth += 1
    return node, depth


def _unknown_key_message(cfg, key: str, line: str, what: str) -> str:
    from omegaconf import DictConfig, OmegaConf

    parts = key.split(".")
    parent, depth = _walk(cfg, parts)
    prefix = ".".join(parts[:depth])
    if not isinstance(parent, DictConfig):
        return f"'{key}': {prefix} is a single value, it has no key '{parts[depth]}'; set {prefix}=<value>"
    valid = sorted(str(k) for k in parent.keys())
    dataclass_backed = OmegaConf.get_type(parent) not in (dict, None)
    if depth and not dataclass_backed:  # a free mapping like model.others: adding needs Hydra's `+`
        return f"'{key}' adds an entry to {prefix}; write +{line}"
    name = parts[depth]
    close = difflib.get_close_matches(name, valid, n=1)
    scope = f"valid {prefix} keys" if prefix else f"valid top-level keys of {what}"
    hint = f" (did you mean {'.'.join(parts[:depth] + [close[0]])}?)" if close else ""
    return f"unknown key '{key}'; {scope}: {', '.join(valid)}{hint}"


def _check_value(cfg, key: str, value, line: str, what: str) -> None:
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    trial = cfg.copy()
    try:
        OmegaConf.update(trial, key, value, merge=True)
    except (ConfigAttributeError, ConfigKeyError):
        raise UsageError(_unknown_key_message(cfg, key, line, what)) from None
    except ValidationError as err:
        node, depth = _walk(cfg, key.split("."))
        if depth < len(key.split(".")):  # the path runs through a single value (seed.x=1)
            raise UsageError(_unknown_key_message(cfg, key, line, what)) from None
        reason = str(err).strip().splitlines()[0].rstrip(".")
        raise UsageError(f"{line} is not valid: {reason}; give {_describe_type(node, key)}") from None
    except OmegaConfBaseException as err:
        raise UsageError(f"{line} is not valid: {str(err).strip().splitlines()[0]}") from None


def check_overrides(argv: list[str], template, what: str = "train.py", conf_dir: Path = CONF_DIR) -> None:
    """Before Hydra starts: every `key=value` on the command line names a key of `template`
    and holds a value of its type (each element of a `-m` sweep too). Group choices
    (`model=x`), hydra.* keys, `+key=...` additions and `~key` deletions are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    groups = _config_groups(conf_dir)
    for token in argv:
        if token.startswith("-") or "=" not in token:
            continue
        try:
            override = parser.parse_overrides([token])[0]
        except HydraException as err:
            reason = str(err).strip().splitlines()[0]
            raise UsageError(f"cannot parse the override {token!r}: {reason}; quote values with spaces or "
                             "special characters, e.g. 'task.template=\"Review: {text}\"'") from None
        key = override.key_or_group
        if (override.type != OverrideType.CHANGE or override.package is not None or "/" in key
                or key.split(".")[0] == "hydra" or key in groups):
            continue
        if override.is_sweep_override():
            try:
                elements = list(override.sweep_string_iterator())
            except Exception:  # a sweep Hydra's sweeper expands itself (interval, ...): check the key only
                elements = []
            values = [(parser.parse_overrides([f"{key}={e}"])[0].value(), f"{key}={e}") for e in elements]
            if not values:
                values = [(None, token)]
        else:
            values = [(override.value(), token)]
        for value, line in values:
            _check_value(template, key, value, line, what)


def exit_on_user_error(fn):
    """Run fn(); a LayerprobeError becomes `error: <message>` on stderr and exit status 2."""
    try:
        return fn()
    except LayerprobeError as err:
        # the run's log file records it too; the console gets the one line below
        record = logging.LogRecord("layerprobe", logging.ERROR, __file__, 0, "%s", (err,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# --- a quiet console ------------------------------------------------------------------------


class OncePerProcess(logging.Filter):
    """Lightning logs its device banner ("GPU available: ...", "TPU available: ...") for every
    Trainer, and a tip about its cloud logger: keep each banner line once per process and drop
    the tips. Warnings and errors always pass."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        message = record.getMessage()
        if "Tip:" in message or "litlogger" in message.lower():
            return False
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def quiet_console() -> None:
    """Call once logging is set up (inside the Hydra task). Lightning's banners appear once per
    process and only through Hydra's handlers (console and the run's log file): the `lightning`
    package adds a console handler of its own on import, which printed every line twice."""
    import lightning  # noqa: F401  (installs those handlers; import it now so they can be removed)

    if logging.getLogger().handlers:
        # `lightning` always adds one; `lightning.pytorch` / `lightning.fabric` add one (and stop
        # propagating) when imported before logging was set up, which also kept them out of train.log
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            own = logging.getLogger(name)
            for handler in list(own.handlers):
                if type(handler) is logging.StreamHandler:
                    own.removeHandler(handler)
            own.propagate = True
    for name in LIGHTNING_INFO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerProcess) for f in logger.filters):
            logger.addFilter(OncePerProcess())
