"""Frozen Hugging Face backbones and one-pass capture of every layer.

Layer numbering follows Hugging Face `hidden_states`: 0 is the embedding output (the
input of the first block), 1..L are the outputs of the L blocks. Layer L is the raw
residual stream of the last block, like every other layer. Llama-style and GPT-2-style
models apply a final norm inside `hidden_states[-1]`; set `extract.final_norm=true` to
apply it here as well (then layer L equals `hidden_states[-1]`).

Capture uses hooks: the blocks are found through a small architecture table, a
pre-hook on the first block takes layer 0, forward hooks on every block take 1..L, and
each hook pools at once, so a forward never keeps L+1 copies of [batch, tokens, d].
"""
from __future__ import annotations

import inspect
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from layerprobe.errors import LayerprobeError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Where each architecture family keeps its block list and final norm, relative to the
# model `AutoModel` returns. Checked in order; the first that exists wins.
BLOCK_PATHS = [
    "layers",  # Llama, Mistral, Qwen2, Gemma, OLMo-2 (LlamaModel and friends)
    "h",  # GPT-2, GPT-J, Bloom, Falcon
    "encoder.layer",  # BERT, RoBERTa
    "model.layers",  # wrappers that keep a base model under .model
    "transformer.h",
    "gpt_neox.layers",
    "decoder.layers",  # OPT
    "blocks",  # OLMo (v1)
    "layers.layers",
]
FINAL_NORM_PATHS = ["norm", "ln_f", "final_layer_norm", "model.norm", "transformer.ln_f", "decoder.final_layer_norm"]


class BackboneError(LayerprobeError):
    """A checkpoint that cannot be loaded or captured; the message says how to fix it."""


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_blocks(model: nn.Module) -> nn.ModuleList:
    n = getattr(model.config, "num_hidden_layers", None)
    for path in BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and (n is None or len(blocks) == n):
            return blocks
    # Unknown architecture: the ModuleList with one entry per hidden layer is the block list.
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n is not None and len(module) == n:
            return module
    raise BackboneError(
        f"could not find the transformer blocks of {type(model).__name__}; add its path to layerprobe.backbone.BLOCK_PATHS"
    )


def find_final_norm(model: nn.Module) -> nn.Module | None:
    for path in FINAL_NORM_PATHS:
        norm = _get(model, path)
        if isinstance(norm, nn.Module):
            return norm
    return None


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[batch, tokens, d] -> [batch, d] over the non-pad tokens given by `mask`.

    Positions come from the mask, not from the padding side, so left and right padding
    give the same vectors.
    """
    mask = mask.to(hidden.device)
    positions = torch.arange(mask.shape[1], device=hidden.device)
    if how == "last":
        idx = (mask * positions).argmax(dim=1)  # largest position holding a real token
    elif how == "first":
        idx = (mask * (mask.shape[1] - positions)).argmax(dim=1)  # smallest such position
    elif how == "mean":
        m = mask.to(torch.float32).unsqueeze(-1)
        return (hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
    else:
        raise ValueError(f"unknown pooling '{how}'; use last, mean or first")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx].float()


class LayerCapture:
    """Hooks that pool every layer during one forward pass; use as a context manager.

    The hooks are always removed on exit, even when the forward raises.
    """

    def __init__(self, model: nn.Module, pooling: str = "last", final_norm: bool = False):
        self.model = model
        self.blocks = find_blocks(model)
        self.pooling = pooling
        self.norm = find_final_norm(model) if final_norm else None
        if final_norm and self.norm is None:
            raise BackboneError(f"extract.final_norm=true but {type(model).__name__} has no final norm I can find")
        self.num_layers = len(self.blocks) + 1
        params = inspect.signature(model.forward).parameters
        # RoBERTa-style embeddings number positions from the pad id on (padding_idx + 1 ...) and
        # derive them from input_ids themselves; 0-based ids would shift them.
        own_positions = hasattr(getattr(model, "embeddings", None), "padding_idx")
        self.accepts_position_ids = "position_ids" in params and not own_positions
        self.accepts_use_cache = "use_cache" in params
        self.mask: torch.Tensor | None = None
        self.pooled: list[torch.Tensor | None] = [None] * self.num_layers
        self._handles: list = []

    def _store(self, layer: int, hidden) -> None:
        if isinstance(hidden, (tuple, list)):
            hidden = hidden[0]
        if layer == self.num_layers - 1 and self.norm is not None:
            hidden = self.norm(hidden)
        self.pooled[layer] = pool(hidden, self.mask, self.pooling)

    def __enter__(self) -> "LayerCapture":
        def pre_hook(_module, args, kwargs):
            self._store(0, args[0] if args else kwargs["hidden_states"])

        self._handles.append(self.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        for i, block in enumerate(self.blocks, start=1):
            self._handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: self._store(i, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One forward; returns pooled features [batch, L+1, d] in float32.

        pool_mask: the tokens pooled over (default: the non-pad tokens); the extractor passes the
        tokens of the user's prompt (layerprobe.prompting), so chat markup is never pooled.
        """
        self.mask = attention_mask if pool_mask is None else pool_mask
        self.pooled = [None] * self.num_layers
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.accepts_position_ids:
            # Count positions from the first real token: with left padding, models with
            # absolute positions (GPT-2) would otherwise see shifted positions.
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if self.accepts_use_cache:
            kwargs["use_cache"] = False
        self.model(**kwargs)
        return torch.stack(self.pooled, dim=1)


def is_local(path_or_id: str) -> bool:
    return os.path.exists(os.path.expanduser(path_or_id))


def looks_like_path(path_or_id: str) -> bool:
    return path_or_id.startswith(("/", "./", "../", "~", ".\\")) or path_or_id.count("/") > 1 or os.sep + os.sep in path_or_id


def check_checkpoint(path_or_id: str, role: str) -> None:
    if not is_local(path_or_id) and looks_like_path(path_or_id):
        raise BackboneError(f"checkpoint path for model '{role}' not found: {path_or_id}; fix model.{role}=<hub id or existing dir>")


def checkpoint_identity(path_or_id: str, revision: str | None = None) -> dict:
    """What identifies the weights, for the feature-store fingerprint.

    Local dirs: config.json plus each weight file's name, size and a hash of its first and
    last MiB (cheap, and changes whenever the weights are rewritten). Hub ids: the commit the
    revision resolves to, read from the local Hugging Face cache (fetching config.json only).
    """
    import hashlib

    if is_local(path_or_id):
        root = Path(path_or_id).expanduser().resolve()
        h = hashlib.sha256()
        files = sorted(p for p in root.iterdir() if p.is_file() and (p.suffix in {".json", ".safetensors", ".bin", ".model"}))
        for p in files:
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            with open(p, "rb") as f:
                h.update(f.read(1 << 20))
                if p.stat().st_size > 2 << 20:
                    f.seek(-(1 << 20), os.SEEK_END)
                    h.update(f.read())
        return {"kind": "local", "path": str(root), "content": h.hexdigest()}
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(path_or_id, revision=revision, allow_patterns=["config.json"])
    except Exception as err:  # hub errors come in many types; all mean the same to the user
        raise BackboneError(
            f"could not resolve model '{path_or_id}' on the Hugging Face hub or in its cache ({type(err).__name__}); "
            "check the id, your network / HF_TOKEN, or point model.<role> at a local directory"
        ) from err
    return {"kind": "hub", "id": path_or_id, "commit": Path(snapshot).name}


def load_backbone(path_or_id: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False, revision=None,
                  device_map=None):
    """Load a frozen, eval-mode backbone and its tokenizer (with a pad token).

    device_map (e.g. "auto"): accelerate places the model over the visible GPUs and it is not
    moved afterwards. A memory estimate is logged before the weights are read.
    """
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        config = AutoConfig.from_pretrained(path_or_id, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0]
        raise BackboneError(f"cannot load model config from '{path_or_id}': {first}") from err
    if getattr(config, "is_encoder_decoder", False):
        raise BackboneError(f"'{path_or_id}' is an encoder-decoder model; layerprobe captures decoder-only or encoder-only stacks")
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    from layerprobe.modelsets import log_memory_estimate

    log_memory_estimate(path_or_id, config, dtype, device_map, trust_remote_code)
    placement = {"device_map": device_map} if device_map else {}
    with quiet_transformers():  # AutoModel drops the LM head of causal checkpoints: expected, not news
        model = AutoModel.from_pretrained(path_or_id, config=config, **{dtype_key: DTYPES[dtype]}, **placement, **kwargs)
    model.eval().requires_grad_(False)
    if not device_map:
        model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kwargs)
    ensure_pad_token(tokenizer)
    return model, tokenizer


def ensure_pad_token(tokenizer) -> None:
    """Tokenizers without a pad token reuse EOS (or UNK); pads are masked out anyway."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.bos_token
        if fallback is None:
            raise BackboneError("the tokenizer has no pad, eos, unk or bos token to pad with; set tokenizer.pad_token")
        tokenizer.pad_token = fallback


@contextmanager
def quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
