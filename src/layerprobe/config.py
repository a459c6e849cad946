"""Typed config schemas, registered in Hydra's ConfigStore.

Each group's YAML files list `schema` first in their defaults, so Hydra type-checks
overrides at compose time (a typo like `probe.layer=3` fails before anything runs).
`__post_init__` checks values when the pipeline turns a section into a dataclass with
`to_dataclass`; each failure is one line that names the key and the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from layerprobe.errors import LayerprobeError

from layerprobe.similarity.config import SimilarityConfig
from layerprobe.tuning.config import TuningConfig


class ConfigError(LayerprobeError):
    """A bad config value; the message names the key and the fix."""


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; use one of {', '.join(map(str, allowed))}")


@dataclass
class PathsConfig:
    cache_dir: str = ".cache/layerprobe"  # features, demo models; shared by all runs and sweep jobs


@dataclass
class DemoModelConfig:
    """The offline demo pair: a tiny Llama pre-trained on raw demo texts, then instruction-tuned."""

    num_layers: int = 8
    hidden_size: int = 64
    num_heads: int = 4
    intermediate_size: int = 192
    pretrain_steps: int = 500
    tune_steps: int = 800
    batch_size: int = 64
    lr: float = 3e-3
    examples_per_task: int = 800
    knowledge_texts: int = 4000  # statements of the lexicon's facts in the base's pre-training corpus
    seed: int = 0
    # Instruction tuning moves later layers most (the study's observation); the demo makes
    # that explicit: block l of L is tuned at lr * (l / L) ** depth_lr_power, embeddings at 0.
    depth_lr_power: float = 2.0

    def __post_init__(self):
        for key in ("num_layers", "hidden_size", "num_heads", "pretrain_steps", "tune_steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.demo.{key} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.demo.hidden_size must be divisible by model.demo.num_heads")


@dataclass
class ModelConfig:
    name: str = "demo"
    base: Optional[str] = None  # hub id or local path; None with build_demo=true
    tuned: Optional[str] = None
    others: Dict[str, str] = field(default_factory=dict)  # more roles, e.g. {sft: path}
    pairs: Optional[List[List[str]]] = None  # role pairs to compare; None = every pair with base
    build_demo: bool = False
    demo: DemoModelConfig = field(default_factory=DemoModelConfig)
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Prompting and loading (docs/models.md). chat_roles: roles whose prompts are wrapped in their
    # tokenizer's chat template, e.g. [tuned]; every role is still read at the end of the user's prompt.
    chat_roles: List[str] = field(default_factory=list)
    system_prompt: Optional[str] = None  # system message for chat-template roles (null = none)
    dtype: Optional[str] = None  # float32 | bfloat16 | float16; null = extract.dtype
    device_map: Optional[str] = None  # e.g. auto: accelerate spreads each model over the visible GPUs
    # MOSSA control models (docs/models.md): task -> full checkpoint dir, hub id or LoRA adapter dir. Each becomes
    # role `control:<task>`, extracted on its task only and compared with every other role there.
    controls: Dict[str, str] = field(default_factory=dict)
    train_controls: bool = False  # train a control (tuning stage, conf/tuning/) for every task of the run without one
    train_tuned: bool = False  # make `tuned` with the tuning stage: base fine-tuned on every seen task (the study's SFT model)
    # Random-weights baseline (docs/probing.md): role `random_init`, the base's architecture and tokenizer with seeded
    # random weights, cached under ${paths.cache_dir}/models/. Probed only; compared only if named in model.pairs.
    random_init: bool = False
    random_init_seed: int = 0

    def __post_init__(self):
        if not self.build_demo and (not self.base or (not self.tuned and not self.train_tuned)):
            raise ConfigError("model.base and model.tuned are required (hub id or local path), e.g. model=smollm2 or model.base=PATH"
                              " (or model.train_tuned=true to make tuned from base)")
        if self.train_tuned and self.tuned:
            raise ConfigError(f"model.train_tuned=true makes the tuned model itself, but model.tuned={self.tuned} is given; "
                              "drop one of them")
        if self.dtype is not None:
            _one_of("model.dtype", self.dtype, ["float32", "bfloat16", "float16"])
        roles = self.roles()
        if isinstance(self.chat_roles, str):
            self.chat_roles = [self.chat_roles]
        controls = {f"control:{t}" for t in self.controls or {}}
        unknown = sorted(set(self.chat_roles or []) - set(roles) - controls - {"control"})
        if unknown:
            raise ConfigError(f"model.chat_roles names role(s) {unknown}; the roles are {sorted(roles)}")
        pairable = {**roles, **({"random_init": None} if self.random_init else {})}
        for pair in self.pairs or []:
            if len(pair) != 2 or any(r not in pairable for r in pair):
                raise ConfigError(f"model.pairs entry {list(pair)} must name two roles from {sorted(pairable)}")

    def roles(self) -> Dict[str, Optional[str]]:
        return {"base": self.base, "tuned": self.tuned, **dict(self.others)}

    def is_chat(self, role: str) -> bool:
        """Whether a role reads its prompts in its chat template (`control` in chat_roles: every control)."""
        chat = set(self.chat_roles or [])
        return role in chat or (role.startswith("control:") and "control" in chat)

    def role_pairs(self) -> List[tuple]:
        if self.pairs:
            return [tuple(p) for p in self.pairs]
        return [("base", r) for r in self.roles() if r != "base"]


@dataclass
class TaskConfig:
    name: str = "demo"
    source: str = "demo"  # demo | file | hf | flan
    tasks: Optional[List[str]] = None  # subset of the suite (None = all)
    fractions: List[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # train / val / test
    split_seed: int = 0
    # demo suite
    n_per_task: int = 400
    data_seed: int = 0
    # file / hf
    path: Optional[str] = None  # local file (source=file) or hub id / dataset dir (source=hf)
    data_name: Optional[str] = None  # datasets config name
    data_split: str = "train"
    template: str = "{text}"  # prompt; {column} placeholders, plus {instruction}
    instruction: str = ""
    label_column: str = "label"
    id_column: Optional[str] = None
    task_column: Optional[str] = None  # one file holding several tasks
    cluster: str = "custom"
    seen: bool = True
    max_examples: Optional[int] = None  # per task, seeded sample
    drop_unlabeled: bool = False  # file / hf: rows without a label are an error; true drops them (the log counts them)
    # flan (docs/tasks.md): the Flan 2021 suite in the inputs / targets / task layout
    data_files: Optional[Any] = None  # local json/jsonl/parquet file(s); null = task.path through datasets
    target: str = "default"  # default (per task, docs/tasks.md) | label | answer_token | task_id | cluster_id
    target_overrides: Dict[str, str] = field(default_factory=dict)  # {task: target}
    answer_top_k: int = 8  # answer_token: the k most frequent first answer tokens, plus "other"
    max_per_cluster: Optional[int] = None  # shared evenly by the selected tasks of each cluster

    def __post_init__(self):
        _one_of("task.source", self.source, ["demo", "file", "hf", "flan"])
        targets = ["default", "label", "answer_token", "task_id", "cluster_id"]
        _one_of("task.target", self.target, targets)
        for name, target in (self.target_overrides or {}).items():
            _one_of(f"task.target_overrides.{name}", target, targets)
        if self.answer_top_k < 1 or (self.max_per_cluster is not None and self.max_per_cluster < 1):
            raise ConfigError("task.answer_top_k and task.max_per_cluster must be >= 1")
        if isinstance(self.data_files, str):
            self.data_files = [self.data_files]
        if len(self.fractions) != 3 or any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1) > 1e-6:
            raise ConfigError(f"task.fractions={list(self.fractions)} must be 3 non-negative numbers summing to 1")
        if self.tasks is not None and isinstance(self.tasks, str):
            self.tasks = [self.tasks]


@dataclass
class ExtractConfig:
    pooling: str = "last"  # over the user's prompt tokens (layerprobe.models.prompting): last | mean | first
    max_length: int = 256  # tokens; longer prompts are truncated on `truncation_side`
    truncation_side: str = "left"  # keep the end of the prompt, where the answer is produced
    dtype: str = "float32"  # backbone dtype: float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N (single-device extraction)
    batch_size: int = 32  # sequences per forward pass
    shard_size: int = 512  # examples per atomically written shard (the unit of resume)
    final_norm: bool = False  # apply the model's final norm to the last layer (= HF hidden_states[-1])
    store_dtype: str = "float32"  # float32 | float16 on disk
    verify: bool = False  # also check the checksum of every cached store before reading it (reads it all; docs in README)

    def __post_init__(self):
        _one_of("extract.pooling", self.pooling, ["last", "mean", "first"])
        _one_of("extract.truncation_side", self.truncation_side, ["left", "right"])
        _one_of("extract.dtype", self.dtype, ["float32", "bfloat16", "float16"])
        _one_of("extract.store_dtype", self.store_dtype, ["float32", "float16"])
        if self.max_length < 2 or self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError("extract.max_length must be >= 2, extract.batch_size and extract.shard_size >= 1")


@dataclass
class ProbeConfig:
    name: str = "linear"  # linear | mlp
    layers: Optional[List[int]] = None  # None = every layer 0..L
    hidden_size: int = 128  # mlp only
    # selected per layer on val; linear probes are fitted to the optimum of each, and 0 has none on separable data
    weight_decays: List[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1])
    lr: float = 1e-2
    max_epochs: int = 60
    patience: int = 10  # epochs without any head improving on val
    batch_size: int = 256
    # Control task (Hewitt & Liang 2019; docs/probing.md): each prompt's type is its recurring content
    # word of least seeded hash; every type gets a random label. Reports control_accuracy, selectivity.
    control: bool = True
    control_seed: int = 1234
    control_min_count: int = 3  # a type word must occur in at least this many prompts of the task
    control_max_share: float = 0.5  # ... and in at most this share of them (template words drop out)
    # MDL probing (Voita & Titov 2020): online codelength over blocks ending at these train fractions
    mdl: bool = True
    mdl_fractions: List[float] = field(default_factory=lambda: [0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125,
                                                                0.25, 0.5, 1.0])
    seeds: Optional[List[int]] = None  # probe fits per seed in one run (null = the run's seed); rows keep their seed
    # full-batch L-BFGS of linear probes: stop a (layer, head) when its estimated loss gap is below solver_tol
    solver_max_iter: int = 100
    solver_tol: float = 1e-4  # nats per example: far below what changes an accuracy

    def __post_init__(self):
        _one_of("probe.name", self.name, ["linear", "mlp"])
        if not self.weight_decays:
            raise ConfigError("probe.weight_decays needs at least one value, e.g. [0.0]")
        if any(w < 0 for w in self.weight_decays):
            raise ConfigError(f"probe.weight_decays={list(self.weight_decays)} must be >= 0")
        if self.max_epochs < 1 or self.batch_size < 1:
            raise ConfigError("probe.max_epochs and probe.batch_size must be >= 1")
        if self.layers is not None and isinstance(self.layers, int):
            self.layers = [self.layers]
        if isinstance(self.seeds, int):
            self.seeds = [self.seeds]
        if self.seeds is not None and not self.seeds:
            raise ConfigError("probe.seeds=[] is empty; give seeds, e.g. probe.seeds=[0,1,2], or null for the run's seed")
        if self.control_min_count < 2:
            raise ConfigError(f"probe.control_min_count={self.control_min_count} must be >= 2 (a type must recur)")
        if not 0 < self.control_max_share <= 1:
            raise ConfigError(f"probe.control_max_share={self.control_max_share} must be in (0, 1]")
        fr = list(self.mdl_fractions)
        if self.mdl and (not fr or any(not 0 < f <= 1 for f in fr) or fr != sorted(fr) or fr[-1] != 1.0):
            raise ConfigError(f"probe.mdl_fractions={fr} must increase within (0, 1] and end at 1.0, "
                              "e.g. [0.001, 0.002, ..., 0.5, 1.0]")
        if self.solver_max_iter < 1 or self.solver_tol <= 0:
            raise ConfigError("probe.solver_max_iter must be >= 1 and probe.solver_tol > 0")


@dataclass
class TrainConfig:
    """The root config of train.py; `trainer` goes to `lightning.Trainer` as is."""

    seed: int = 0
    report: bool = True  # write the analysis report into the run dir at the end
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)


GROUP_SCHEMAS = {
    "paths": PathsConfig,
    "model": ModelConfig,
    "task": TaskConfig,
    "extract": ExtractConfig,
    "probe": ProbeConfig,
    "similarity": SimilarityConfig,
    "tuning": TuningConfig,
}


def register_configs() -> None:
    """Register each group's schema as `<group>/schema` for the YAML files to extend."""
    cs = ConfigStore.instance()
    for group, schema in GROUP_SCHEMAS.items():
        node = OmegaConf.structured(schema)
        if group == "model":  # `model.controls.<task>=DIR` works without Hydra's `+` (the key set is the user's)
            OmegaConf.set_struct(node.controls, False)
        cs.store(group=group, name="schema", node=node)
    from layerprobe.tasks.demo import DEMO_TASKS

    # `task=<demo task>` selects one demo task, so `-m task=sentiment,topic` sweeps tasks.
    for name in DEMO_TASKS:
        cs.store(group="task", name=name, node={"defaults": ["demo"], "name": name, "tasks": [name]})


def to_dataclass(schema, node: DictConfig | dict):
    """Instantiate `schema` from a config node, running its `__post_init__` checks.

    Nested dataclass fields are built recursively so their checks run too.
    """
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    known = {f.name: f for f in fields(schema)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for {schema.__name__}; valid: {sorted(known)}")
    kwargs = {}
    for key, value in data.items():
        default = known[key].default_factory() if callable(known[key].default_factory) else None
        if hasattr(default, "__dataclass_fields__") and isinstance(value, dict):
            value = to_dataclass(type(default), value)
        kwargs[key] = value
    return schema(**kwargs)
