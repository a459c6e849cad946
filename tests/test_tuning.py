"""The tuning stage: answer-only labels rendered like extraction, LoRA that leaves the base bit-identical,
a cached second request, kill -9 + resume, and trainer.devices=2 (CPU DDP) equal to one device."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, WORDS, tiny_llama, word_tokenizer
from layerprobe.models.prompting import PromptEncoder, make_spec
from layerprobe.tuning import SFTExamples, TuningConfig, training_plan, tune
from layerprobe.tuning import run as tuning_run

CPU = {"accelerator": "cpu", "devices": 1}


def pairs(n=48, seed=0):
    rng = np.random.default_rng(seed)
    prompts = [" ".join(rng.choice(WORDS[:12], size=5)) + " ?" for _ in range(n)]
    answers = [["one", "two", "three"][int(rng.integers(3))] for _ in range(n)]
    return prompts, answers


def recipe(**kw):
    base = dict(lr=2e-2, max_steps=12, batch_size=4, grad_accum=1, save_every_n_steps=4, logger=None, target_modules=["q_proj", "v_proj"])
    return TuningConfig(**{**base, **kw})


def adapter(root: Path) -> dict:
    return load_file(str(Path(root) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("tune") / "base", layers=2)


def test_labels_cover_the_answer_only_and_prompts_render_as_in_extraction():
    tok = word_tokenizer()
    prompts, answers = ["the red cat sat on the mat ?", "a dog ?"], ["one", "two three"]
    ds = SFTExamples(tok, prompts, answers, max_length=64)
    for (ids, labels), p, a in zip(ds.items, prompts, answers):
        prompt_ids = tok(p)["input_ids"]  # BOS + words, as extraction tokenizes a plain prompt
        answer_ids = tok(" " + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == prompt_ids + answer_ids
        assert labels == [-100] * len(prompt_ids) + answer_ids
    # loss_on=all (pre-training): every token is a label
    ids, labels = SFTExamples(tok, prompts, None, loss_on="all").items[0]
    assert labels == ids == tok(prompts[0])["input_ids"] + [tok.eos_token_id]

    from test_prompting import chat_tokenizer

    chat = chat_tokenizer()
    spec = make_spec(chat, True, "be brief", "control:x", "chat")
    ids, labels = SFTExamples(chat, prompts[:1], answers[:1], spec).items[0]
    extracted = PromptEncoder(chat, spec, max_length=256).encode(prompts[:1])[0].ids  # what extraction reads
    assert ids[: len(extracted)] == extracted and labels[: len(extracted)] == [-100] * len(extracted)
    assert labels[len(extracted):] == ids[len(extracted):] and len(ids) > len(extracted)


def test_long_inputs_keep_the_answer_and_the_prompt_end():
    tok = word_tokenizer()
    prompt = " ".join(WORDS * 3)
    ids, labels = SFTExamples(tok, [prompt], ["one"], max_length=10).items[0]
    assert len(ids) == 10 and ids[0] == tok.bos_token_id
    assert ids[-2:] == [tok.convert_tokens_to_ids("one"), tok.eos_token_id] and labels[:-2] == [-100] * 8
    assert ids[-3] == tok.convert_tokens_to_ids(WORDS[-1])


def test_plan_is_a_fixed_sequence_of_permutations():
    plan = training_plan(n=20, batch_size=3, grad_accum=2, world_size=1, epochs=2, max_steps=None, seed=5)
    assert plan.shape == (6, 2, 1, 3)  # 20 // 6 = 3 steps per pass, 2 passes
    flat = plan.reshape(2, -1)
    for p in range(2):
        assert len(set(flat[p].tolist())) == 18  # no repeats within a pass
    assert np.array_equal(plan, training_plan(20, 3, 2, 1, 2, None, 5))
    assert training_plan(20, 3, 2, 1, 2, 7, 5).shape[0] == 7  # max_steps cycles the passes


def test_lora_trains_only_the_adapter_and_a_second_request_reuses_it(base, tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    seen = {}
    real_publish = tuning_run.publish

    def spy(model, tokenizer, root, work, state, manifest):
        assert state is None  # one device: the model's own weights are published
        seen["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        real_publish(model, tokenizer, root, work, state, manifest)

    monkeypatch.setattr(tuning_run, "publish", spy)
    prompts, answers = pairs()
    root = tune(str(base), prompts, answers, recipe(), tmp_path / "cache", CPU, name="control:t")
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    trained = seen["state"]
    frozen = {k: v for k, v in trained.items() if "lora_" not in k}
    assert len(frozen) == len(original)
    for key, value in frozen.items():
        plain = key.replace("base_model.model.", "", 1).replace(".base_layer", "")
        assert torch.equal(value, original[plain]), key  # bit-identical
    saved = adapter(root)
    assert saved and all("lora_" in k for k in saved)  # the dir holds the adapter alone
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # lora_B starts at zero: it trained
    assert not (root / "model.safetensors").exists() and (root / "manifest.json").exists()

    monkeypatch.setattr(tuning_run, "fit", lambda *a, **k: pytest.fail("trained again"))
    with caplog.at_level(logging.INFO, logger="layerprobe.tuning.run"):
        again = tune(str(base), prompts, answers, recipe(), tmp_path / "cache", CPU, name="control:t")
    assert again == root and "reused (nothing trained)" in caplog.text
    # other data or another recipe: another model
    assert tuning_run.read_manifest(root)["data"]["examples"] == len(prompts)


def test_full_fine_tuning_with_lr_scales_freezes_what_scale_zero_names(base, tmp_path):
    from transformers import AutoModelForCausalLM

    prompts, answers = pairs()

    def scale(name):
        return 0.0 if "embed_tokens" in name else 1.0

    scale.fingerprint = "embed-frozen"
    root = tune(str(base), prompts, answers, recipe(method="full", lr=1e-2), tmp_path / "cache", CPU, name="sft", lr_scale=scale)
    before = AutoModelForCausalLM.from_pretrained(base).state_dict()
    after = AutoModelForCausalLM.from_pretrained(root).state_dict()
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not torch.equal(before["model.layers.1.mlp.down_proj.weight"], after["model.layers.1.mlp.down_proj.weight"])


def kill_at_step_from_env() -> None:
    """In a tuning subprocess: with KILL_AT=k in the environment, kill -9 the process once global step k is done."""
    import signal

    from layerprobe.tuning.module import CausalLMTuning

    kill_at = int(os.environ.get("KILL_AT", "0"))
    if kill_at:
        def on_train_batch_end(self, *args):
            if self.trainer.global_step >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        CausalLMTuning.on_train_batch_end = on_train_batch_end


SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from layerprobe.tuning import TuningConfig, tune
from test_tuning import kill_at_step_from_env, pairs, recipe
kill_at_step_from_env()
if os.environ.get("START"):  # a concurrent job: log like train.py does, begin when the start file appears
    import logging, time
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    Path(os.environ["READY"]).touch()
    while not Path(os.environ["START"]).exists():
        time.sleep(0.02)
trainer = {{"accelerator": "cpu", "devices": int(os.environ.get("DEVICES", "1"))}}
if trainer["devices"] > 1:
    trainer["strategy"] = "ddp"
prompts, answers = pairs()
cfg = recipe(grad_accum=int(os.environ.get("ACCUM", "1")), max_steps=int(os.environ.get("STEPS", "12")))
print("ROOT", tune({base!r}, prompts, answers, cfg, Path(os.environ["CACHE"]), trainer, name="x"))
"""


def script_command(tmp_path, base, **env):
    script = tmp_path / "tune_script.py"
    script.write_text(textwrap.dedent(SCRIPT.format(tests=str(ROOT / "tests"), base=str(base))))
    full = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **{k: str(v) for k, v in env.items()}}
    return [sys.executable, str(script)], full


def run_script(tmp_path, base, **env):
    command, full = script_command(tmp_path, base, **env)
    return subprocess.run(command, capture_output=True, text=True, timeout=180, env=full, cwd=tmp_path)


def test_two_jobs_asking_for_the_same_model_at_once_train_it_once(base, tmp_path):
    """Two sweep jobs that need the same control start together: the fingerprint's file lock lets one train while
    the other waits, then reuses the published dir (manifest written last, the dir renamed into place)."""
    import time

    cache, start = tmp_path / "cache", tmp_path / "start"
    jobs = []
    for i in range(2):
        command, env = script_command(tmp_path, base, CACHE=cache, START=start, READY=tmp_path / f"ready{i}")
        jobs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path))
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):  # both imported: they start at the same moment
        assert time.time() < deadline and all(j.poll() is None for j in jobs), [j.communicate() for j in jobs]
        time.sleep(0.05)
    start.touch()
    outputs = [j.communicate(timeout=180) for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], [err[-3000:] for _, err in outputs]
    logs = [err for _, err in outputs]
    assert sorted("model x: trained in" in log for log in logs) == [False, True]  # one job trained
    waiter = next(log for log in logs if "model x: trained in" not in log)
    assert "reused (nothing trained)" in waiter and "tuning x (" not in waiter  # the other trained nothing
    roots = {line.split(" ", 1)[1] for out, _ in outputs for line in out.splitlines() if line.startswith("ROOT ")}
    [manifest] = list((cache / "models").glob("*/manifest.json"))
    assert roots == {str(manifest.parent)}
    assert tuning_run.read_manifest(manifest.parent)["train"]["steps"] == 12
    assert sorted(p.name for p in (cache / "models").iterdir() if p.is_dir()) == [manifest.parent.name]  # no tmp/work dirs


def test_kill_9_then_resume_gives_the_same_adapter(base, tmp_path, caplog):
    prompts, answers = pairs()
    reference = tune(str(base), prompts, answers, recipe(), tmp_path / "ref", CPU, name="x")

    killed = run_script(tmp_path, base, CACHE=tmp_path / "cache", KILL_AT=6)
    assert killed.returncode == -9, killed.stderr[-2000:]
    models = tmp_path / "cache" / "models"
    assert not list(models.glob("*/manifest.json"))  # nothing published
    assert list(models.glob(".*.work/checkpoints/last.ckpt"))  # the step-4 resume point
    with caplog.at_level(logging.INFO, logger="layerprobe.tuning.run"):
        resumed = tune(str(base), prompts, answers, recipe(), tmp_path / "cache", CPU, name="x")
    assert "resuming tuning from" in caplog.text
    assert tuning_run.read_manifest(resumed)["train"]["steps"] == 12
    ref, res = adapter(reference), adapter(resumed)
    assert ref.keys() == res.keys()
    for k in ref:
        torch.testing.assert_close(res[k], ref[k], rtol=1e-5, atol=1e-6)
    assert not list(models.glob(".*.work"))  # the work dir goes once the model is published


def test_two_cpu_ranks_equal_one_device(base, tmp_path):
    """trainer.devices=2 (gloo DDP) with grad_accum=1 takes the same 8 examples per optimizer step as one device with
    grad_accum=2, rank r the r-th half; both average two micro-batch means. Stated tolerance: 1e-5 on every adapter
    weight (the same sums in another order)."""
    from conftest import tiny_llama  # noqa: F401
    from _scaling import free_port

    one = run_script(tmp_path, base, CACHE=tmp_path / "one", ACCUM=2, STEPS=6)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_script(tmp_path, base, CACHE=tmp_path / "two", ACCUM=1, STEPS=6, DEVICES=2, MASTER_PORT=free_port())
    assert two.returncode == 0, two.stderr[-3000:]
    [a] = list((tmp_path / "one" / "models").glob("*/manifest.json"))
    [b] = list((tmp_path / "two" / "models").glob("*/manifest.json"))
    assert tuning_run.read_manifest(b.parent)["train"]["world_size"] == 2
    wa, wb = adapter(a.parent), adapter(b.parent)
    assert any(v.abs().sum() > 0 for k, v in wa.items() if "lora_B" in k)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_step_bounded_fits_show_no_negative_last_epoch_or_logger_version(tmp_path):
    """Lightning's own bar prints a fit bounded by max_steps (max_epochs=-1) as "Epoch 1/-2" and
    adds the logger's "v_num"; the bar of the demo and tuning fits shows neither."""
    import io

    import lightning as L
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader, TensorDataset

    from layerprobe.progress import StepsProgressBar

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)

        def training_step(self, batch, _):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def console_of(bar_class) -> str:
        out = io.StringIO()
        bar = bar_class(console_kwargs={"file": out, "force_terminal": True, "width": 200})
        loader = DataLoader(TensorDataset(torch.randn(8, 3), torch.randn(8, 1)), batch_size=4)
        trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, callbacks=[bar], logger=CSVLogger(tmp_path),
                            enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=1)
        trainer.fit(Regression(), loader)
        assert trainer.global_step == 5  # 2 batches an epoch: the fit ends in its third epoch, as max_steps says
        return out.getvalue()

    stock, ours = console_of(RichProgressBar), console_of(StepsProgressBar)
    assert "/-2" in stock and "v_num" in stock  # what a user saw before
    assert "Epoch 2" in ours and "loss" in ours
    assert "/-2" not in ours and "v_num" not in ours
