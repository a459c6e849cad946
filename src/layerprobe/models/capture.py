"""One-pass capture of every layer of a frozen backbone.

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

import torch
from torch import nn

from layerprobe.models.load import BackboneError

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
        f"could not find the transformer blocks of {type(model).__name__}; add its path to layerprobe.models.capture.BLOCK_PATHS"
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
        tokens of the user's prompt (layerprobe.models.prompting), so chat markup is never pooled.
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


