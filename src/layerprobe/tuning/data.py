"""Prompt -> answer pairs as token ids and labels, and the fixed order they are trained in.

Prompts are rendered exactly as extraction renders them for the same role
(layerprobe.models.prompting: plain, or the tokenizer's chat template with the generation
prompt), then the answer follows (`answer_prefix` + answer + EOS). With `loss_on=answer`
the prompt's tokens get label -100, so the loss is on the answer tokens only.

The order is a plan fixed before training: data pass p is a permutation drawn from
(seed, p); optimizer step s takes `batch_size x grad_accum x world` examples, rank r the
r-th slice of each micro-batch. A run killed at any point resumes from its last checkpoint
(every `save_every_n_steps` optimizer steps) at that step of the plan: the same batches.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from layerprobe.models.prompting import PromptSpec, render_chat, render_plain
from layerprobe.tuning.config import TuningError

LLAMA2_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\nIf a question does not make any "
    "sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the "
    "answer to a question, please don't share false information."
)
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
CHAT_TEMPLATES = {"llama2": LLAMA2_CHAT_TEMPLATE}


def apply_chat_template_setting(tokenizer, chat_template: str | None) -> None:
    """tuning.chat_template: a named template (llama2) or jinja text, written into the tokenizer."""
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATES.get(chat_template, chat_template)


def pairs_hash(prompts: list[str], answers: list[str] | None) -> str:
    """The training data's content, for the model-cache fingerprint."""
    h = hashlib.sha256()
    for i, p in enumerate(prompts):
        h.update(json.dumps([p, None if answers is None else answers[i]]).encode())
    return h.hexdigest()


class SFTExamples(Dataset):
    """Token ids and labels for (prompt, answer) pairs; answers=None trains on the prompt texts alone.

    truncation: prompt_left (default: cut the prompt on the left, keep its leading special token and
    the whole answer) or right (cut the whole sequence at max_length).
    """

    def __init__(self, tokenizer, prompts: list[str], answers: list[str] | None, spec: PromptSpec | None = None,
                 max_length: int = 1024, loss_on: str = "answer", answer_prefix: str = " ", truncation: str = "prompt_left"):
        spec = spec or PromptSpec()
        if answers is None and loss_on == "answer":
            raise TuningError("loss_on=answer needs answers; use loss_on=all to train on the prompt texts alone")
        if answers is not None and len(answers) != len(prompts):
            raise TuningError(f"{len(prompts)} prompts but {len(answers)} answers")
        texts = [render_chat(tokenizer, p, spec.system_prompt)[0] if spec.chat else render_plain(p)[0] for p in prompts]
        # chat templates write their own BOS; plain prompts get the tokenizer's special tokens (as in extraction)
        prompt_ids = tokenizer(texts, add_special_tokens=not spec.chat)["input_ids"]
        eos = tokenizer.eos_token_id
        if answers is not None:
            answer_ids = tokenizer([answer_prefix + a for a in answers], add_special_tokens=False)["input_ids"]
        self.items = []
        self.cut = 0
        for i, p in enumerate(prompt_ids):
            a = (answer_ids[i] if answers is not None else []) + ([eos] if eos is not None else [])
            if truncation == "right":  # plain cut of the whole sequence at max_length (pre-training texts)
                ids = (p + a)[:max_length]
                labels = ([-100] * len(p) + a)[:max_length] if loss_on == "answer" else list(ids)
                self.cut += len(p) + len(a) > max_length
                self.items.append((ids, labels))
                continue
            a = a[: max_length - 1]
            room = max_length - len(a)
            if len(p) > room:  # keep the prompt's end (next to the answer) and its leading special token
                lead = p[:1] if p and p[0] in tokenizer.all_special_ids else []
                p = lead + p[len(p) - (room - len(lead)):]
                self.cut += 1
            ids = p + a
            labels = ([-100] * len(p) + a) if loss_on == "answer" else list(ids)
            self.items.append((ids, labels))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def answer_tokens(self) -> int:
        return sum(sum(l != -100 for l in lab) for _, lab in self.items)

    def collate(self, batch):
        """Right padding (positions start at 0 for every row); pads never count in the loss."""
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(lab)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def training_plan(n: int, batch_size: int, grad_accum: int, world_size: int, epochs: int, max_steps: int | None,
                  seed: int) -> np.ndarray:
    """[steps, grad_accum, world, batch_size] example indices: the whole run's order, fixed up front.

    A pass over the data is a permutation from (seed, pass); an incomplete last step of a
    pass is dropped. max_steps (if set) cycles passes until that many optimizer steps.
    """
    per_step = batch_size * grad_accum * world_size
    steps_per_pass = n // per_step
    if steps_per_pass < 1:
        raise TuningError(f"{n} training examples are fewer than one optimizer step takes "
                          f"(batch_size {batch_size} x grad_accum {grad_accum} x {world_size} device(s)); "
                          "lower tuning.batch_size / tuning.grad_accum or add data")
    total = max_steps if max_steps is not None else epochs * steps_per_pass
    passes = math.ceil(total / steps_per_pass)
    order = [np.random.default_rng([seed, p]).permutation(n)[: steps_per_pass * per_step] for p in range(passes)]
    flat = np.concatenate(order)[: total * per_step]
    return flat.reshape(total, grad_accum, world_size, batch_size)


class MicroBatches(Dataset):
    """Keys are lists of example indices (from PlanSampler); items are collated micro-batches."""

    def __init__(self, examples: SFTExamples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, indices):
        return self.examples.collate([self.examples[i] for i in indices])


def _as_is(batch):
    return batch


def plan_loader(examples: SFTExamples, plan: np.ndarray, rank: int, start_step: int = 0):
    from torch.utils.data import DataLoader

    return DataLoader(MicroBatches(examples), sampler=PlanSampler(plan, rank, start_step), batch_size=None, collate_fn=_as_is)


class PlanSampler(Sampler):
    """This rank's micro-batches of the plan, from optimizer step `start_step` on (a resumed run).

    Its length stays that of the whole plan: Lightning, restoring a run mid-epoch, counts the
    batches it already did and stops at `max_steps`, which the plan's end meets exactly.
    """

    def __init__(self, plan: np.ndarray, rank: int, start_step: int = 0):
        self.plan, self.rank, self.start_step = plan, rank, start_step

    def __iter__(self):
        for step in self.plan[self.start_step:]:
            for micro in step:
                yield micro[self.rank].tolist()

    def __len__(self) -> int:
        return self.plan.shape[0] * self.plan.shape[1]
