"""The tuning stage under FSDP (trainer.strategy=fsdp): the strategy's defaults, the refusals, and two CPU ranks
that train the same adapter as one device, publish it gathered from the shards, and resume after kill -9.

Lightning runs FSDP on GPUs only, but torch's FSDP trains on CPU ranks over gloo once it is told its device. The
subprocess script below therefore swaps `layerprobe.tuning.run.FSDPStrategy` for `CPUFSDPStrategy`, a subclass
that changes only what the CPU needs (see its docstring); everything else - the wrap policy, use_orig_params,
full-state checkpoints, the gather before publishing - is the production code path.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_gpt2
from test_tuning import CPU, adapter, base, pairs, recipe  # noqa: F401  (base: the tiny Llama fixture)
from layerprobe import distributed
from layerprobe.distributed import DistributedError
from layerprobe.tuning import TuningError, tune
from layerprobe.tuning import run as tuning_run

SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path

import torch
import torch.distributed.fsdp as torch_fsdp
import lightning.fabric.strategies.fsdp as fabric_fsdp
import lightning.pytorch.strategies.fsdp as pl_fsdp
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import save_file

from layerprobe.distributed import Ranks
from layerprobe.tuning import tune
from layerprobe.tuning import run as tuning_run
from test_tuning import pairs, recipe


FSDP = torch_fsdp.FullyShardedDataParallel


class OnCPU(FSDP):
    def __init__(self, module, *args, device_id=None, **kwargs):
        super().__init__(module, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)


def full_state_without_offload(module, world_size, rank0_only=True):
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FSDP.state_dict_type(
        module, StateDictType.FULL_STATE_DICT, FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only))


class CPUFSDPStrategy(FSDPStrategy):
    '''Lightning's FSDPStrategy on CPU ranks (gloo), changed in three places only:
    - a subclass: Lightning refuses `type(strategy) is FSDPStrategy` with accelerator=cpu;
    - FSDP gets device_id=cpu: Lightning passes root_device.index, None on the CPU, and torch then refuses
      ("FSDP needs a non-CPU accelerator device");
    - full state dicts without offload_to_cpu (Lightning always asks for it): offloading to the CPU what is on
      the CPU already crashes torch (segfault) on the gather.'''

    def _setup_model(self, model):
        torch_fsdp.FullyShardedDataParallel = OnCPU  # Lightning imports the name from there when it wraps
        try:
            return super()._setup_model(model)
        finally:
            torch_fsdp.FullyShardedDataParallel = FSDP


fabric_fsdp._get_full_state_dict_context = pl_fsdp._get_full_state_dict_context = full_state_without_offload
tuning_run.FSDPStrategy = CPUFSDPStrategy

import logging
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")  # as train.py logs: "resuming tuning from ..."
from test_tuning import kill_at_step_from_env
kill_at_step_from_env()
if os.environ.get("DUMP"):  # what rank 0 publishes: the gathered weights that are not LoRA's (the frozen base)
    real_publish = tuning_run.publish

    def publish(model, tokenizer, root, work, state, manifest):
        save_file({{k: v.contiguous() for k, v in state.items() if "lora_" not in k}}, f"{{os.environ['DUMP']}}.{{manifest['name']}}")
        real_publish(model, tokenizer, root, work, state, manifest)
    tuning_run.publish = publish

# as the pipeline hands it over: trainer.* says ddp for extraction and probes, Ranks.tuning_strategy says fsdp
trainer = {{"accelerator": "cpu", "devices": 2, "strategy": "ddp"}}
ranks = Ranks(trainer, tuning_strategy="fsdp")
prompts, answers = pairs()
cfg = recipe(method=os.environ.get("METHOD", "lora"), lr=float(os.environ.get("LR", "2e-2")), max_steps=6)
print("ROOT", tune({base!r}, prompts, answers, cfg, Path(os.environ["CACHE"]), trainer, name="x", ranks=ranks))
if os.environ.get("SECOND"):  # a second model in the same processes, as the pipeline trains one control per task
    prompts, answers = pairs(seed=1)
    print("ROOT", tune({base!r}, prompts, answers, cfg, Path(os.environ["CACHE"]), trainer, name="y", ranks=ranks))
"""


def run_fsdp(tmp_path: Path, base: Path, **env) -> subprocess.CompletedProcess:
    from _scaling import free_port

    script = tmp_path / "fsdp_script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(ROOT / "tests"), base=str(base))))
    full = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "MASTER_PORT": str(free_port()),
            **{k: str(v) for k, v in env.items()}}
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240, env=full, cwd=tmp_path)


def published(cache: Path, name: str = "x") -> Path:
    [root] = [m.parent for m in (cache / "models").glob("*/manifest.json") if tuning_run.read_manifest(m.parent)["name"] == name]
    return root


def one_device(base: Path, cache: Path, seed: int = 0, **kw) -> Path:
    """The reference: one device, grad_accum=2, so each optimizer step averages the same two micro-batches of 4
    that the two FSDP ranks (grad_accum=1) take, rank r the r-th (training_plan)."""
    prompts, answers = pairs(seed=seed)
    return tune(str(base), prompts, answers, recipe(grad_accum=2, max_steps=6, **kw), cache, CPU, name="x")


# --- the strategy and the refusals (no process group needed) -----------------------------------


def test_fsdp_defaults_wrap_each_decoder_layer_and_keep_peft_params(base, tmp_path):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import AutoModelForCausalLM

    llama = tuning_run.add_lora(AutoModelForCausalLM.from_pretrained(base), recipe())
    strategy = tuning_run.fsdp_strategy(llama)
    assert type(strategy) is tuning_run.FSDPStrategy
    policy = strategy.kwargs["auto_wrap_policy"]
    layers = llama.base_model.model.model.layers
    # the unit is the block class that the model's layer list holds (found via _no_split_modules through peft)
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {type(layers[0])}
    assert type(layers[0]).__name__ == "LlamaDecoderLayer"
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy._state_dict_type == "full"

    gpt2 = AutoModelForCausalLM.from_pretrained(tiny_gpt2(tmp_path / "gpt2"))
    assert tuning_run.decoder_layer_classes(gpt2) == {type(gpt2.transformer.h[0])}
    assert type(gpt2.transformer.h[0]).__name__ == "GPT2Block"

    class NoBlocks(torch.nn.Module):  # e.g. remote code without _no_split_modules
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    with pytest.raises(TuningError, match="names no decoder-layer class.*trainer.strategy=ddp"):
        tuning_run.fsdp_strategy(NoBlocks())


def test_fsdp_on_cpu_is_refused_in_one_line_that_names_the_fix(tmp_path, monkeypatch):
    for cfg in ({"accelerator": "cpu", "devices": 2, "strategy": "fsdp"}, {"accelerator": "cpu", "devices": 1, "strategy": "FSDP"}):
        with pytest.raises(DistributedError, match="trainer.strategy=fsdp needs GPUs.*trainer.accelerator=gpu.*trainer.strategy=ddp"):
            distributed.launch(cfg)  # before any process starts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DistributedError, match="accelerator is cpu"):
        distributed.check_strategy({"accelerator": "auto", "strategy": "fsdp"})  # auto on a machine without GPUs
    distributed.check_strategy({"accelerator": "cpu", "strategy": "ddp"})  # DDP on the CPU stays allowed


def test_fsdp_cli_on_cpu_exits_2_with_one_error_line(tmp_path):
    from _scaling import overrides

    from conftest import tiny_llama

    models = (tiny_llama(tmp_path / "base"), tiny_llama(tmp_path / "tuned", seed=1))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *overrides(models, tmp_path / "cache", "trainer.devices=2", "trainer.strategy=fsdp")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "trainer.strategy=fsdp needs GPUs" in errors[0] and "trainer.strategy=ddp" in errors[0]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # refused before anything was extracted


def test_fsdp_on_gpus_launches_like_ddp_and_keeps_fsdp_for_tuning_only(monkeypatch):
    """What launch() hands the pipeline (one device: no process starts, so this runs without a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ranks = distributed.launch({"accelerator": "gpu", "devices": 1, "strategy": "fsdp"})
    assert ranks.trainer_cfg["strategy"] == "auto" and ranks.tuning_strategy == "fsdp"  # extraction, probes: not FSDP
    ranks = distributed.launch({"accelerator": "cpu", "devices": 1, "strategy": "ddp"})
    assert ranks.trainer_cfg["strategy"] == "ddp" and ranks.tuning_strategy is None  # DDP as before


# --- two CPU ranks under FSDP ---------------------------------------------------------------------


def test_two_fsdp_ranks_publish_the_one_device_adapter_and_leave_the_base_untouched(base, tmp_path):
    """Two models in the same two processes (as the pipeline trains one control per task), each equal to its
    one-device run. Stated tolerance: rtol 1e-4, atol 1e-5 on every adapter weight, as for DDP (test_tuning): the
    same sums in another order (FSDP reduce-scatters the gradients and averages them over the ranks; one device
    averages the two micro-batches itself), float32, 6 AdamW steps at lr 2e-2."""
    from transformers import AutoModelForCausalLM

    two = run_fsdp(tmp_path, base, CACHE=tmp_path / "two", DUMP=tmp_path / "frozen.safetensors", SECOND=1)
    assert two.returncode == 0, two.stderr[-4000:]
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for seed, name in enumerate(["x", "y"]):
        reference = adapter(one_device(base, tmp_path / f"one{seed}", seed=seed))
        root = published(tmp_path / "two", name)
        manifest = tuning_run.read_manifest(root)
        assert manifest["train"]["world_size"] == 2 and manifest["train"]["strategy"] == "fsdp"
        assert manifest["train"]["steps"] == 6 and manifest["method"] == "lora"
        sharded = adapter(root)
        assert sharded.keys() == reference.keys() and all("lora_" in k for k in sharded)  # the adapter alone
        assert not (root / "model.safetensors").exists()
        assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sharded.items())  # lora_B starts at zero: it trained
        for k in reference:
            assert sharded[k].shape == reference[k].shape, k  # gathered, not one rank's shard
            torch.testing.assert_close(sharded[k], reference[k], rtol=1e-4, atol=1e-5)
        # the frozen weights rank 0 gathered from the shards are the base's, bit for bit
        frozen = load_file(f"{tmp_path / 'frozen.safetensors'}.{name}")
        assert len(frozen) == len(original)
        for key, value in frozen.items():
            plain = key.replace("base_model.model.", "", 1).replace(".base_layer", "")
            assert torch.equal(value, original[plain]), key
    x, y = adapter(published(tmp_path / "two", "x")), adapter(published(tmp_path / "two", "y"))
    assert not any(torch.equal(x[k], y[k]) for k in x if "lora_B" in k)  # two models, each trained on its own data


def test_two_fsdp_ranks_killed_mid_run_resume_from_the_full_checkpoint(base, tmp_path):
    """kill -9 of both ranks after optimizer step 5 of 6; the step-4 checkpoint (a full state dict gathered on
    rank 0, save_every_n_steps=4) resumes under FSDP to the one-device adapter (tolerance as above)."""
    reference = adapter(one_device(base, tmp_path / "one"))
    killed = run_fsdp(tmp_path, base, CACHE=tmp_path / "cache", KILL_AT=5)
    assert killed.returncode == -9, killed.stderr[-4000:]
    models = tmp_path / "cache" / "models"
    assert not list(models.glob("*/manifest.json"))
    [ckpt] = list(models.glob(".*.work/checkpoints/last.ckpt"))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4 and saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])
    resumed = run_fsdp(tmp_path, base, CACHE=tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming tuning from" in resumed.stderr
    root = published(tmp_path / "cache")
    assert tuning_run.read_manifest(root)["train"]["steps"] == 6
    res = adapter(root)
    assert res.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(res[k], reference[k], rtol=1e-4, atol=1e-5)


def test_two_fsdp_ranks_full_fine_tuning_publishes_the_whole_gathered_model(base, tmp_path):
    """method=full: every weight is sharded and trained; rank 0 publishes the gathered model (config.json +
    model.safetensors), equal to the one-device model within rtol 1e-4 / atol 1e-5 (as above; lr 1e-3)."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(one_device(base, tmp_path / "one", method="full", lr=1e-3)).state_dict()
    two = run_fsdp(tmp_path, base, CACHE=tmp_path / "two", METHOD="full", LR="1e-3")
    assert two.returncode == 0, two.stderr[-4000:]
    root = published(tmp_path / "two")
    sharded = AutoModelForCausalLM.from_pretrained(root).state_dict()
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert sharded.keys() == reference.keys()
    assert not torch.equal(sharded["model.layers.1.mlp.down_proj.weight"], before["model.layers.1.mlp.down_proj.weight"])
    for k in reference:
        torch.testing.assert_close(sharded[k], reference[k], rtol=1e-4, atol=1e-5)
