"""Stacked probe heads: every (layer, head) classifier lives in one set of tensors.

Parameters keep explicit layer (dim 0) and head dims, so one batched matmul evaluates
all layers and heads, and per-head bookkeeping (best-on-val snapshots, weight decay)
is a broadcast instead of a Python loop. A "head" is one (target variant, weight decay)
combination trained on one layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class StackedHeads(nn.Module):
    def __init__(self, num_layers: int, dim: int, num_heads: int, num_classes: int, kind: str = "linear", hidden: int = 128):
        super().__init__()
        self.kind, self.L, self.K, self.C = kind, num_layers, num_heads, num_classes
        if kind == "linear":
            self.weight = nn.Parameter(self._init(num_layers, dim, num_heads, num_classes, fan_in=dim))
            self.bias = nn.Parameter(torch.zeros(num_layers, num_heads, num_classes))
        elif kind == "mlp":
            self.hidden = hidden
            self.weight = nn.Parameter(self._init(num_layers, dim, num_heads, hidden, fan_in=dim))
            self.bias = nn.Parameter(torch.zeros(num_layers, num_heads, hidden))
            self.weight2 = nn.Parameter(self._init(num_layers, num_heads, hidden, num_classes, fan_in=hidden))
            self.bias2 = nn.Parameter(torch.zeros(num_layers, num_heads, num_classes))
        else:
            raise ValueError(f"unknown probe kind '{kind}'; use linear or mlp")

    @staticmethod
    def _init(*shape, fan_in: int) -> torch.Tensor:
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(*shape).uniform_(-bound, bound)

    # which dim of each parameter indexes the head (dim 0 is always the layer)
    HEAD_DIM = {"weight": 2, "bias": 1, "weight2": 1, "bias2": 1}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [batch, L, d] -> logits [batch, L, K, C]."""
        xl = x.transpose(0, 1)  # [L, B, d]
        L, B = xl.shape[:2]
        first = torch.bmm(xl, self.weight.reshape(L, self.weight.shape[1], -1))  # [L, B, K*out]
        first = first.view(L, B, self.K, -1) + self.bias.unsqueeze(1)
        if self.kind == "linear":
            return first.transpose(0, 1)
        h = torch.nn.functional.gelu(first)  # [L, B, K, hidden]
        out = torch.einsum("lbkh,lkhc->lbkc", h, self.weight2) + self.bias2.unsqueeze(1)
        return out.transpose(0, 1)

    def sq_norms(self) -> torch.Tensor:
        """[L, K] squared norm of each head's weights (biases are not decayed)."""
        norms = self.weight.pow(2).sum(dim=(1, 3))
        if self.kind == "mlp":
            norms = norms + self.weight2.pow(2).sum(dim=(2, 3))
        return norms

    @torch.no_grad()
    def copy_heads_from(self, source: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        """Overwrite the heads where mask [L, K] is true with the values in `source`."""
        for name, param in self.named_parameters():
            shape = [1] * param.dim()
            shape[0], shape[self.HEAD_DIM[name]] = self.L, self.K
            param.copy_(torch.where(mask.view(shape), source[name], param))
