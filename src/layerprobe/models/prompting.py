"""Prompts -> token ids, and the one place in them every model is read at.

The guarantee base and tuned (and every other role) rely on: each model is read on the
characters of the *user's prompt* (the task's rendered text), whatever surrounds them.

- A plain role tokenizes the prompt as is; the special tokens its tokenizer adds around it
  (BOS, BERT's [CLS]/[SEP], an appended EOS) are context, not part of the prompt.
- A chat role (`model.chat_roles: [tuned]`) renders `[system?, user: prompt]` with
  the tokenizer's chat template and `add_generation_prompt=True`; the markup before the
  prompt and the generation prompt after it are context too.

Pooling then runs over the prompt's tokens only: `extract.pooling=last` reads the token
holding the prompt's last (non-space) character, `first` the token holding its first, `mean`
the tokens in between. The tokens are found from character offsets into the rendered text,
so two roles with different tokenizers, or with and without a chat template, still read the
same place of the same text: the end of the user's prompt. For tokenizers that append
nothing (Llama, GPT-2, Qwen, ...) `last` is the last non-pad token, as before.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from layerprobe.models.load import check_checkpoint, ensure_pad_token, quiet_transformers
from layerprobe.errors import LayerprobeError

log = logging.getLogger(__name__)

# Changes whenever the rule above changes, so cached features made under another rule are not reused.
POSITION_RULE = "prompt-chars/v1"
_SENTINEL = "\ue000layerprobe-user-prompt\ue001"


class PromptError(LayerprobeError):
    """A prompt setting that cannot work with a tokenizer; the message says how to fix it."""


@dataclass(frozen=True)
class PromptSpec:
    """How one role's prompts are rendered: plain, or inside its tokenizer's chat template."""

    chat: bool = False
    system_prompt: str | None = None
    template_hash: str | None = None  # sha256 of the chat template text (templates live outside config.json)

    def fingerprint(self) -> dict:
        """What enters the feature-store fingerprint."""
        if not self.chat:
            return {"positions": POSITION_RULE, "chat_template": None}
        return {"positions": POSITION_RULE, "chat_template": self.template_hash, "system_prompt": self.system_prompt}


def chat_template_of(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one is used
        template = template.get("default")
    return template or None


def make_spec(tokenizer, chat: bool, system_prompt: str | None, role: str, checkpoint: str) -> PromptSpec:
    if not chat:
        return PromptSpec()
    template = chat_template_of(tokenizer)
    if template is None:
        raise PromptError(
            f"model.chat_roles includes '{role}' but the tokenizer of '{checkpoint}' has no chat template; "
            f"remove '{role}' from model.chat_roles or use a checkpoint whose tokenizer has one"
        )
    digest = hashlib.sha256(template.encode()).hexdigest()[:16]
    return PromptSpec(chat=True, system_prompt=system_prompt, template_hash=digest)


def render_chat(tokenizer, prompt: str, system_prompt: str | None = None) -> tuple[str, int, int]:
    """The chat-rendered text and the [start, end) characters of the user's prompt inside it.

    The prompt is located by rendering once more with a sentinel as the user message: the
    text before the sentinel is the template's prefix, and the prompt must follow it.
    """
    def apply(content: str) -> str:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
        messages.append({"role": "user", "content": content})
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # jinja raises its own errors, e.g. "System role not supported"
            hint = " (drop model.system_prompt?)" if system_prompt else ""
            raise PromptError(f"the chat template failed to render a prompt: {err}{hint}") from err

    text = apply(prompt)
    probe = apply(_SENTINEL)
    cut = probe.find(_SENTINEL)
    core = prompt.strip()
    start = text.find(core, cut) if cut >= 0 and text.startswith(probe[:cut]) else -1
    if start < 0 or text[cut:start].strip():
        raise PromptError("the chat template rewrites the prompt text, so the user's prompt cannot be located inside it; "
                          "remove this role from model.chat_roles")
    return text, start, start + len(core)


def render_plain(prompt: str) -> tuple[str, int, int]:
    stripped = prompt.lstrip()
    return prompt, len(prompt) - len(stripped), len(prompt.rstrip())


@dataclass
class Encoded:
    ids: list[int]
    first: int  # token index (into ids) of the first token of the user's prompt
    last: int  # ... and of its last token
    truncated: bool


class PromptEncoder:
    """Renders, tokenizes, truncates and pads prompts for one role, tracking the prompt's tokens."""

    def __init__(self, tokenizer, spec: PromptSpec | None = None, max_length: int = 256, truncation_side: str = "left"):
        self.tokenizer = tokenizer
        self.spec = spec or PromptSpec()
        self.max_length = max_length
        self.truncation_side = truncation_side
        self.unlocated = 0  # prompts whose characters were cut away entirely (read at the last kept token)

    def render(self, prompt: str) -> tuple[str, int, int]:
        if self.spec.chat:
            return render_chat(self.tokenizer, prompt, self.spec.system_prompt)
        return render_plain(prompt)

    def encode(self, prompts: list[str]) -> list[Encoded]:
        rendered = [self.render(p) for p in prompts]
        texts = [r[0] for r in rendered]
        # chat templates write their own BOS; plain prompts get the tokenizer's special tokens
        kwargs = {"add_special_tokens": not self.spec.chat, "return_special_tokens_mask": True}
        try:
            enc = self.tokenizer(texts, return_offsets_mapping=True, **kwargs)
            offsets = enc["offset_mapping"]
        except (NotImplementedError, ValueError, KeyError):  # tokenizers without offsets (slow, python ones)
            return [self._encode_by_pieces(text, start, end) for text, start, end in rendered]
        return [self._finish(ids, specials, offs, start, end)
                for ids, specials, offs, (_, start, end) in zip(enc["input_ids"], enc["special_tokens_mask"], offsets, rendered)]

    def _finish(self, ids, specials, offsets, start: int, end: int) -> Encoded:
        keep = self._truncate(specials)
        ids = [ids[j] for j in keep]
        offsets = [offsets[j] for j in keep]
        inside = [j for j, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        if not inside:
            if not self.unlocated:
                log.warning("truncation to extract.max_length=%d cut away a whole prompt; such prompts are read at "
                            "their last kept token (raise extract.max_length)", self.max_length)
            self.unlocated += 1
            inside = [len(ids) - 1]
        return Encoded(ids, inside[0], inside[-1], len(keep) < len(specials))

    def _truncate(self, specials: list[int]) -> list[int]:
        """Indices kept under max_length: cut on `truncation_side`, keeping the special tokens at both ends."""
        n = len(specials)
        if n <= self.max_length:
            return list(range(n))
        lead = next((j for j, s in enumerate(specials) if not s), n)
        trail = next((j for j, s in enumerate(reversed(specials)) if not s), 0)
        room = self.max_length - lead - trail
        if room < 1:  # nothing but special tokens fits: plain cut
            return list(range(n - self.max_length, n)) if self.truncation_side == "left" else list(range(self.max_length))
        body = list(range(lead, n - trail))
        body = body[-room:] if self.truncation_side == "left" else body[:room]
        return list(range(lead)) + body + list(range(n - trail, n))

    def _encode_by_pieces(self, text: str, start: int, end: int) -> Encoded:
        """Fallback without offsets: tokenize before / prompt / after separately and join."""
        tok = self.tokenizer
        pieces = [tok(t, add_special_tokens=False)["input_ids"] for t in (text[:start], text[start:end], text[end:])]
        ids = pieces[0] + pieces[1] + pieces[2]
        # a stand-in offset per token: the prompt's tokens cover [start, end), the others nothing
        spans = [(0, 0)] * len(pieces[0]) + [(start, end)] * len(pieces[1]) + [(0, 0)] * len(pieces[2])
        specials = [0] * len(ids)
        if not self.spec.chat:
            mask = tok.get_special_tokens_mask(ids)
            rest = iter(spans)
            spans = [(0, 0) if m else next(rest) for m in mask]
            ids, specials = tok.build_inputs_with_special_tokens(ids), mask
        return self._finish(ids, specials, spans, start, end)

    def pad(self, rows: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask and the prompt-token mask (what is pooled), padded on the tokenizer's side."""
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        prompt = torch.zeros((len(rows), width), dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for i, r in enumerate(rows):
            o = width - len(r.ids) if left else 0
            ids[i, o : o + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
            attention[i, o : o + len(r.ids)] = 1
            prompt[i, o + r.first : o + r.last + 1] = 1
        return ids, attention, prompt


def load_tokenizer(checkpoint: str, trust_remote_code: bool = False, revision=None):
    from transformers import AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code, revision=revision)
    ensure_pad_token(tok)
    return tok


def vocab_hash(tokenizer) -> str:
    return hashlib.sha256(repr(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def prepare_prompts(model_cfg, checkpoints: dict[str, str]) -> dict[str, PromptSpec]:
    """Each role's PromptSpec, checked before any backbone runs.

    Fails (PromptError) when a role asks for a chat template its tokenizer lacks; warns when
    the roles' tokenizers differ (allowed: positions stay aligned by characters, see above).
    """
    specs, vocabularies = {}, {}
    for role, checkpoint in checkpoints.items():
        check_checkpoint(checkpoint, role)
        try:
            tok = load_tokenizer(checkpoint, model_cfg.trust_remote_code, model_cfg.revision)
        except Exception as err:  # hub and file errors come in many types; all mean the same here
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise PromptError(f"could not load the tokenizer of model '{role}' ({checkpoint}): {first}; check the id, "
                              f"your network / HF_TOKEN, or point model.{role} at a local directory") from err
        specs[role] = make_spec(tok, model_cfg.is_chat(role), model_cfg.system_prompt, role, checkpoint)
        vocabularies[role] = vocab_hash(tok)
    roles = list(checkpoints)
    for role in roles[1:]:
        if vocabularies[role] != vocabularies[roles[0]]:
            log.warning("the tokenizers of '%s' and '%s' differ; both are still read at the same characters "
                        "(the end of the user's prompt), but their token sequences differ", roles[0], role)
    for role, spec in specs.items():
        if spec.chat:
            log.info("model '%s': prompts wrapped in its chat template (generation prompt on), read at the end of the user's prompt", role)
    return specs
