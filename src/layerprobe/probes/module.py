"""The probe LightningModule and the DataModule of cached features.

One fit trains, for every selected layer of every model that shares a feature width,
a head per (target variant, weight decay): variant 0 is the task's labels, variant 1
(optional) the control task's shuffled labels. After each validation epoch every head
keeps its best-so-far weights; at the end each (layer, variant) picks the weight decay
with the best val accuracy. Test metrics come from torchmetrics on the selected heads.
"""
from __future__ import annotations

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from layerprobe.distributed import RankSliceBatchSampler, rescale_for_ranks
from layerprobe.probes.heads import StackedHeads


class _Rows(Dataset):
    """Rows of features and targets, indexed a whole batch at a time (no per-row collate)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx):
        idx = torch.as_tensor(idx)
        return self.x[idx], self.y[idx]


class CachedFeatureData(L.LightningDataModule):
    """Train/val/test tensors of [n, layers, d] features, standardized with train statistics.

    features: [n, layers, d] (already the selected layers, possibly several models side by
    side); targets: [n, V] integer labels per variant; split_idx: row indices per split.
    Batches are gathered with one index operation each: probe steps are so cheap that a
    per-row collate would dominate.
    """

    def __init__(self, features: np.ndarray, targets: np.ndarray, split_idx: dict[str, np.ndarray], batch_size: int):
        super().__init__()
        self.batch_size = batch_size
        tensors = {s: torch.from_numpy(np.asarray(features[idx], dtype=np.float32)) for s, idx in split_idx.items()}
        train = tensors["train"]
        # float64 sums over examples; the centred pass keeps the variance accurate in float32 data
        mean = train.sum(0, dtype=torch.float64) / len(train)
        var = (train - mean.float()).pow(2).sum(0, dtype=torch.float64) / len(train)
        std = var.sqrt()
        # constant dims carry no signal: dividing by 1 keeps them at 0 instead of NaN
        self.mean, self.std = mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()
        self.data = {s: _Rows((x - self.mean) / self.std, torch.from_numpy(targets[split_idx[s]])) for s, x in tensors.items()}

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        rows = self.data[split]
        order = RandomSampler(rows) if shuffle else SequentialSampler(rows)
        return DataLoader(rows, sampler=BatchSampler(order, self.batch_size, drop_last=False), batch_size=None)

    def train_dataloader(self):
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:  # DDP: each rank takes its slice of every global batch
            rows = self.data["train"]
            slices = RankSliceBatchSampler(len(rows), self.batch_size, trainer.global_rank, trainer.world_size)
            return DataLoader(rows, sampler=slices, batch_size=None)
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False)

    def test_dataloader(self):
        return self._loader("test", False)


class ProbeModule(L.LightningModule):
    def __init__(self, num_layers: int, dim: int, num_classes: int, num_variants: int, weight_decays: list[float],
                 kind: str = "linear", hidden: int = 128, lr: float = 1e-2, patience: int = 10, min_delta: float = 1e-3,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["mean", "std"])
        self.V, self.G, self.C = num_variants, len(weight_decays), num_classes
        self.heads = StackedHeads(num_layers, dim, self.V * self.G, num_classes, kind, hidden)
        # head k = (variant k // G, weight decay k % G)
        self.register_buffer("wd", torch.tensor(weight_decays, dtype=torch.float32).repeat(self.V))
        self.register_buffer("variant_of_head", torch.arange(self.V).repeat_interleave(self.G))
        # train statistics travel with the probe so a saved probe can read raw features
        self.register_buffer("feature_mean", mean if mean is not None else torch.zeros(num_layers, dim))
        self.register_buffer("feature_std", std if std is not None else torch.ones(num_layers, dim))
        K = self.V * self.G
        self.register_buffer("best_val_acc", torch.full((num_layers, K), -1.0))
        self.register_buffer("best_val_loss", torch.full((num_layers, K), float("inf")))
        self.best_state = {n: p.detach().clone() for n, p in self.heads.named_parameters()}
        self.stale_epochs = 0
        self.epochs_run = 0
        self._val: list = []
        self._test: list = []
        self.results: dict[str, torch.Tensor] = {}

    def _head_targets(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.variant_of_head]  # [B, K]

    def _per_head_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, Lyr, K, C = logits.shape
        target = self._head_targets(y).unsqueeze(1).expand(B, Lyr, K)
        loss = F.cross_entropy(logits.reshape(-1, C), target.reshape(-1), reduction="none")
        return loss.view(B, Lyr, K).mean(0)  # [L, K]

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = rescale_for_ranks(self, self._per_head_loss(self.heads(x), y), len(y))  # one device: unchanged
        # heads are independent, so summing their losses trains each on its own objective
        total = loss.sum() + (self.wd * self.heads.sq_norms()).sum()
        self.log("train_loss", loss.mean(), prog_bar=False)
        return total

    def configure_optimizers(self):
        return torch.optim.Adam(self.heads.parameters(), lr=self.hparams.lr)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.heads(x)
        self._val.append((logits.argmax(-1), self._per_head_loss(logits, y) * len(y), self._head_targets(y)))

    def on_validation_epoch_end(self):
        preds = torch.cat([p for p, _, _ in self._val])  # [N, L, K]
        target = torch.cat([t for _, _, t in self._val])  # [N, K]
        loss_sum = torch.stack([l for _, l, _ in self._val]).sum(0)
        self._val.clear()
        correct = (preds == target.unsqueeze(1)).float().sum(0)
        counts = torch.tensor(float(len(target)), device=correct.device)
        correct, loss_sum, counts = (self.all_gather(t) for t in (correct, loss_sum, counts))
        if correct.dim() == 3:  # gathered across ranks
            correct, loss_sum, counts = correct.sum(0), loss_sum.sum(0), counts.sum()
        acc, loss = correct / counts, loss_sum / counts
        if self.trainer.sanity_checking:
            return
        improved = (acc > self.best_val_acc) | ((acc == self.best_val_acc) & (loss < self.best_val_loss))
        previous = self.best_val_acc.mean()
        self.best_val_acc = torch.where(improved, acc, self.best_val_acc)
        self.best_val_loss = torch.where(improved, loss, self.best_val_loss)
        for name, param in self.heads.named_parameters():
            shape = [1] * param.dim()
            shape[0], shape[StackedHeads.HEAD_DIM[name]] = improved.shape
            self.best_state[name] = torch.where(improved.view(shape), param.detach(), self.best_state[name].to(param.device))
        # Patience follows the mean best val accuracy over heads: with many heads, one of them
        # always gains a lucky example, which would keep the fit going forever.
        gained = self.best_val_acc.mean() > previous + self.hparams.min_delta
        self.stale_epochs = 0 if bool(gained) else self.stale_epochs + 1
        self.epochs_run = self.current_epoch + 1
        if self.stale_epochs >= self.hparams.patience:
            self.trainer.should_stop = True
        self.log("val_acc", acc.max(), prog_bar=False, sync_dist=False)

    def selected_heads(self) -> torch.Tensor:
        """[L, V]: for each layer and variant, the head (weight decay) with the best val score."""
        acc = self.best_val_acc.view(-1, self.V, self.G)
        loss = self.best_val_loss.view(-1, self.V, self.G)
        score = acc - 1e-6 * torch.tanh(loss)  # accuracy first, lower val loss breaks ties
        return score.argmax(-1) + torch.arange(self.V, device=score.device) * self.G

    def on_fit_end(self):
        self.heads.copy_heads_from(self.best_state, torch.ones_like(self.best_val_acc, dtype=torch.bool))

    def test_step(self, batch, batch_idx):
        x, y = batch
        self._test.append((self.heads(x).argmax(-1), y))

    def on_test_epoch_end(self):
        preds = torch.cat([p for p, _ in self._test])  # [N, L, K]
        y = torch.cat([t for _, t in self._test])  # [N, V]
        self._test.clear()
        sel = self.selected_heads()  # [L, V]
        Lyr, V = sel.shape
        chosen = torch.gather(preds, 2, sel.unsqueeze(0).expand(len(preds), Lyr, V))  # [N, L, V]
        # torchmetrics "samplewise" treats dim 0 as independent samples: here (layer, variant)
        p = chosen.permute(1, 2, 0).reshape(Lyr * V, -1)
        t = y.T.unsqueeze(0).expand(Lyr, V, -1).reshape(Lyr * V, -1)
        acc = multiclass_accuracy(p, t, self.C, average="micro", multidim_average="samplewise")
        f1 = multiclass_f1_score(p, t, self.C, average="macro", multidim_average="samplewise")
        self.results = {
            "accuracy": acc.view(Lyr, V).cpu(),
            "macro_f1": f1.view(Lyr, V).cpu(),
            "val_accuracy": torch.gather(self.best_val_acc, 1, sel).cpu(),
            "weight_decay": self.wd[sel].cpu(),
        }
