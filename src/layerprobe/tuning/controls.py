"""The MOSSA models of a run: one control per task (single-task tuning) and the multi-task SFT model.

- `model.controls.<task>=<dir | hub id | LoRA adapter dir>`: given controls, checked first
  (the task is in the run, the dir exists, an adapter belongs to this base and, for a hub base, to
  the revision it loads; a full checkpoint shares the base's architecture and tokenizer).
- `model.train_controls=true`: every task of the run without a given control gets one, trained
  from the base with the tuning stage (`tuning.*`) on that task's train split only.
- `model.train_tuned=true`: `tuned` is the base fine-tuned on every seen task's train split,
  at most `tuning.max_per_cluster` examples per task cluster (shared evenly by its tasks).

Answers: a task's answer text per example is `meta["answers"][id]` when its source keeps the
answer (contrast examples of other tasks left out), else its label's name for label targets (the
demo suite, label columns).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

from layerprobe.models.load import checkpoint_identity, has_tokenizer, is_adapter_dir
from layerprobe.models.roles import (ControlError, check_adapter_base, check_controls, check_same_family, control_role,
                                     read_adapter_file)
from layerprobe.tuning.config import TuningError
from layerprobe.tuning.run import tune

log = logging.getLogger(__name__)


def answers_of(task) -> list[str | None]:
    """The answer text of every example of `task`; TuningError when the task has none.

    With `meta["answers"]`, the examples of other tasks that a task_id / cluster_id target adds as
    contrast (`meta["contrast"]` of them) have no answer of this task: None, never trained on."""
    answers = task.meta.get("answers")
    if answers:
        own = [answers.get(ex.id) for ex in task.examples]
        if any(a is not None for a in own) and sum(a is None for a in own) <= int(task.meta.get("contrast", 0)):
            return own
    target = task.meta.get("target", "label")
    if target != "label":
        raise TuningError(f"task '{task.name}' has no answer text to train on (its probe target is '{target}', not the answer); "
                          f"give model.controls.{task.name}=<checkpoint> or use a source that keeps the answers")
    return [task.label_names[ex.label] for ex in task.examples]


def task_pairs(task, split: str = "train") -> tuple[list[str], list[str]]:
    """(prompts, answers) of one task's split: a control trains on these and nothing else."""
    answers = answers_of(task)
    rows = [i for i, ex in enumerate(task.examples) if ex.split == split and answers[i] is not None]
    return [task.examples[i].text for i in rows], [answers[i] for i in rows]


def sft_pairs(tasks, max_per_cluster: int | None, seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """The multi-task mix: every seen task's train pairs, capped per cluster (shared evenly, seeded sample)."""
    seen = [t for t in tasks if t.seen]
    if not seen:
        raise TuningError("model.train_tuned=true needs at least one seen task (task.seen / the suite's seen flags)")
    by_cluster: dict[str, list] = {}
    for t in seen:
        by_cluster.setdefault(t.cluster, []).append(t)
    prompts, answers, names = [], [], []
    for cluster, members in by_cluster.items():
        quota = None if max_per_cluster is None else -(-max_per_cluster // len(members))
        for t in members:
            p, a = task_pairs(t)
            keep = np.arange(len(p))
            if quota is not None and len(p) > quota:
                keep = np.sort(np.random.default_rng([seed, len(t.name)] + [ord(c) for c in t.name]).permutation(len(p))[:quota])
            prompts += [p[i] for i in keep]
            answers += [a[i] for i in keep]
            names.append(t.name)
    return prompts, answers, names


def _recipe_for(model_cfg, tuning_cfg, role: str):
    """Train with the prompt rendering the role is extracted with (model.chat_roles, model.system_prompt)."""
    chat = model_cfg.is_chat(role) or tuning_cfg.chat
    return replace(tuning_cfg, chat=chat, system_prompt=model_cfg.system_prompt if chat else None)


def check_given_controls(model_cfg, tasks, base: str | None) -> None:
    """Everything about the given controls that can be checked before any model runs."""
    check_controls(model_cfg.controls, [t.name for t in tasks])
    if not base:
        return
    base_identity = checkpoint_identity(base, model_cfg.revision) if model_cfg.controls else None
    for task, checkpoint in (model_cfg.controls or {}).items():
        checkpoint = str(checkpoint)
        if is_adapter_dir(checkpoint):
            check_adapter_base(task, checkpoint, base, base_identity, model_cfg.revision)
            check_adapter_revision(task, checkpoint, base, base_identity, model_cfg.revision)
            if has_tokenizer(checkpoint):
                _check_tokenizer(task, checkpoint, base, model_cfg)
        else:
            check_same_family(task, checkpoint, base, model_cfg.revision, model_cfg.trust_remote_code)


def check_adapter_revision(task: str, adapter_dir: str, base: str, base_identity: dict, revision=None) -> None:
    """A LoRA adapter that names a revision of its hub base (adapter_config.json `revision`) must be an adapter of
    the revision this run loads (`model.revision`, default main); both are resolved to commits where the local
    Hugging Face cache can, else compared by name. Not checked: adapters made by the tuning stage (their manifest
    records the base's commit, checked by `check_adapter_base`), adapters that name no revision (peft's default),
    and local bases (a directory has one version; its weights are what identify it)."""
    from pathlib import Path

    from layerprobe.models.load import BackboneError, is_local

    root = Path(adapter_dir).expanduser()
    if (root / "manifest.json").exists() or is_local(base) or base_identity.get("kind") != "hub":
        return
    config = read_adapter_file(task, root, "adapter_config.json")
    made_for = config.get("revision")
    if made_for in (None, ""):
        return
    loaded = revision or "main"
    if str(made_for) == str(loaded) or str(made_for) == base_identity.get("commit"):
        return
    try:
        if checkpoint_identity(base, str(made_for)).get("commit") == base_identity.get("commit"):
            return  # a branch or tag that resolves to the commit this run loads
    except BackboneError:
        pass  # a revision the local cache cannot resolve: it is not the loaded one
    raise ControlError(f"model.controls.{task}: the LoRA adapter {adapter_dir} was made for revision '{made_for}' of "
                       f"{config.get('base_model_name_or_path') or base}, but this run loads revision '{loaded}' "
                       f"(commit {base_identity.get('commit')}) of the base {base}; set model.revision={made_for} "
                       f"or give an adapter trained on revision '{loaded}'")


def _check_tokenizer(task, checkpoint, base, model_cfg):
    from layerprobe.models.prompting import load_tokenizer, vocab_hash

    if vocab_hash(load_tokenizer(checkpoint, model_cfg.trust_remote_code)) != vocab_hash(
            load_tokenizer(base, model_cfg.trust_remote_code, model_cfg.revision)):
        raise ControlError(f"model.controls.{task}: the tokenizer of the control {checkpoint} differs from that of the base "
                           f"{base}; a control must keep the base's tokenizer")


def check_trainable(model_cfg, tasks) -> None:
    """Before anything trains: every task that gets a trained control has answer text."""
    if model_cfg.train_controls:
        for t in tasks:
            if t.name not in (model_cfg.controls or {}):
                answers_of(t)
    if model_cfg.train_tuned:
        for t in tasks:
            if t.seen:
                answers_of(t)


def make_controls(model_cfg, tuning_cfg, tasks, base: str, cache_dir, trainer_cfg: dict, ranks=None,
                  data_for=None) -> dict[str, str]:
    """role -> checkpoint for every control of the run: given ones, and trained ones (cached) if asked.

    data_for(task) -> (prompts, answers) replaces the task's train split (the demo trains its
    controls on tuning data the probes never see).
    """
    out = {control_role(t): str(c) for t, c in (model_cfg.controls or {}).items()}
    if not model_cfg.train_controls:
        return out
    for task in tasks:
        role = control_role(task.name)
        if role in out:
            continue
        prompts, answers = data_for(task) if data_for else task_pairs(task)
        recipe = _recipe_for(model_cfg, tuning_cfg, role)
        out[role] = str(tune(base, prompts, answers, recipe, cache_dir, trainer_cfg, name=role, tasks=[task.name],
                             revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, ranks=ranks))
    return out


def make_tuned(model_cfg, tuning_cfg, tasks, base: str, cache_dir, trainer_cfg: dict, ranks=None, data=None) -> str:
    """The experimental SFT model: the base tuned on the multi-task mix of the seen tasks (cached)."""
    prompts, answers, names = data if data is not None else sft_pairs(tasks, tuning_cfg.max_per_cluster, tuning_cfg.seed)
    recipe = _recipe_for(model_cfg, tuning_cfg, "tuned")
    return str(tune(base, prompts, answers, recipe, cache_dir, trainer_cfg, name="tuned", tasks=names,
                    revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code, ranks=ranks))


DEMO_CONTROL_SEED = 20_000  # the probe data uses task.data_seed, the demo pair's tuning 10_000 + seed


def demo_control_corpus(demo_cfg, task_name: str) -> tuple[list[str], list[str]]:
    """A demo task's control training pairs: `model.demo.examples_per_task` fresh examples from a seed that
    neither the probe data nor the demo pair's own training uses."""
    from layerprobe.tasks.demo import DEMO_TASKS, demo_examples, render

    spec = DEMO_TASKS[task_name]
    pairs = demo_examples(spec, demo_cfg.examples_per_task, seed=DEMO_CONTROL_SEED + demo_cfg.seed)
    return [render(spec, text) for text, _ in pairs], [answer for _, answer in pairs]
