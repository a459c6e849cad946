"""The probe LightningModule and the DataModule of cached features.

One fit trains, for every selected layer of every model that shares a feature width, a
head per (spec, weight decay). Specs: 0 = the task's labels on the whole train split;
1 (optional) = the control task's labels (layerprobe.probes.controls); then one spec per
MDL block = the task's labels on a prefix of the train split (its rows in the seeded MDL
order). Head k = spec k // G, weight decay k % G.

Linear probes are fitted full-batch: the train loader yields one batch (this rank's train
rows), and `training_step` solves every (layer, head) problem to convergence with the
batched L-BFGS of layerprobe.probes.solver (manual optimization; under DDP its sums are
all-reduced, so every rank takes the same steps). MLP probes train by Adam on mini-batches,
keeping each head's best-on-val weights. Either way, each layer then selects the weight
decay of its task head on val; the control head uses the same weight decay. Test metrics
come from torchmetrics on the selected heads.
"""
from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

from layerprobe.distributed import RankSliceBatchSampler, rescale_for_ranks
from layerprobe.probes.heads import StackedHeads
from layerprobe.probes.solver import fit_softmax_heads


class _Rows(Dataset):
    """Rows of standardized features, targets and MDL positions, indexed a whole batch at a time.

    x: [layers, N, d] layer-major storage (the full-batch solver's and the heads' layout);
    a slice index is a view of it, row positions gather a copy.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, pos: torch.Tensor):
        self.x, self.y, self.pos = x, y, pos

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, idx):
        if not isinstance(idx, slice):
            idx = torch.as_tensor(idx)
        return self.x[:, idx].transpose(0, 1), self.y[idx], self.pos[idx]  # x as [rows, layers, d]


class _SliceBatches:
    """Consecutive batches as slices, so a batch of layer-major rows is a view, not a gather."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        return (slice(i, min(i + self.batch_size, self.n)) for i in range(0, self.n, self.batch_size))


def _gather_layer_major(feats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """feats [N, layers, d] (any strides) -> rows of every layer, [layers, len(rows), d], in one pass."""
    n, layers, d = feats.shape
    out = torch.empty(layers, len(rows), d, dtype=torch.float32)
    for layer in range(layers):
        torch.index_select(feats[:, layer], 0, rows, out=out[layer])
    return out


def _row_sum(t: torch.Tensor) -> torch.Tensor:
    """[layers, rows, d] -> float64 [layers, d]: float64 sums of float32 sums over blocks of 256
    rows (as accurate as float64 sums of every row, and ~10x faster)."""
    if t.shape[1] == 0:
        return torch.zeros(t.shape[0], t.shape[2], dtype=torch.float64)
    return torch.stack([t[:, i : i + 256].sum(1) for i in range(0, t.shape[1], 256)]).sum(0, dtype=torch.float64)


class CachedFeatureData(L.LightningDataModule):
    """Train/val/test tensors of [n, layers, d] features, standardized with train statistics.

    features: [n, layers, d] (already the selected layers, possibly several models side by
    side); targets: [n, V] integer labels per variant; split_idx: row indices per split;
    positions: [n_train] each train row's place in the MDL order (default: as given).
    Every split is gathered once into layer-major [layers, n_split, d] storage and
    standardized in place, so batches are views and the heads read contiguous rows per layer.
    full_batch: the train loader yields this rank's whole share of the train split as one
    batch (for the full-batch solver), and val and test come as one batch each; otherwise
    shuffled train mini-batches and val/test batches of batch_size.
    """

    def __init__(self, features: np.ndarray, targets: np.ndarray, split_idx: dict[str, np.ndarray], batch_size: int,
                 positions: np.ndarray | None = None, full_batch: bool = False):
        super().__init__()
        self.batch_size, self.full_batch = batch_size, full_batch
        features = np.asarray(features, dtype=np.float32)  # a view when already float32
        with warnings.catch_warnings():  # a read-only store (memmap) is fine: it is only ever read
            warnings.filterwarnings("ignore", message=".*not writable.*")
            feats = torch.from_numpy(features)
        layers = feats.shape[1]
        rows = {s: torch.from_numpy(np.asarray(idx, dtype=np.int64)) for s, idx in split_idx.items()}
        split = {s: _gather_layer_major(feats, idx) for s, idx in rows.items()}
        train = split["train"]
        n_train = train.shape[1]
        mean = _row_sum(train) / max(n_train, 1)  # [layers, d]
        train -= mean.float().unsqueeze(1)
        # the centred pass keeps the variance accurate in float32 data
        var = torch.cat([_row_sum(train[layer : layer + 1].square()) for layer in range(layers)]) / max(n_train, 1)
        std = var.sqrt()
        # constant dims carry no signal: dividing by 1 keeps them at 0 instead of NaN
        self.mean, self.std = mean.float(), torch.where(std > 1e-8, std, torch.ones_like(std)).float()
        train /= self.std.unsqueeze(1)
        for s, x in split.items():
            if s != "train":
                x.sub_(self.mean.unsqueeze(1)).div_(self.std.unsqueeze(1))
        pos = {"train": torch.from_numpy(np.asarray(positions if positions is not None else np.arange(n_train), dtype=np.int64))}
        self.data = {s: _Rows(split[s], torch.from_numpy(targets[split_idx[s]]),
                              pos.get(s, torch.full((len(rows[s]),), -1, dtype=torch.int64))) for s in split}

    def release(self) -> None:
        """Drop the feature tensors now. The Trainer and this DataModule reference each other,
        so without this every task's features (a copy of its cache) would stay in memory until
        Python's cycle collector happens to run: a sweep over many tasks would hold several
        at once, and each new task would touch fresh memory instead of reusing the last one's.
        The Trainer's loaders hold the row sets too, so the row sets themselves let go."""
        for rows in self.data.values():
            rows.x = rows.x.new_empty(0, 0, rows.x.shape[2])
        self.data = {}

    def _eval_loader(self, split: str) -> DataLoader:
        rows = self.data[split]
        size = max(len(rows), 1) if self.full_batch else self.batch_size
        return DataLoader(rows, sampler=_SliceBatches(len(rows), size), batch_size=None)

    def train_dataloader(self):
        trainer = self.trainer
        rows = self.data["train"]
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self.full_batch:  # one batch: this rank's rows (every world-th), all of them on one device
            # a slice: on one device the batch is a view of the (layer-major) train tensor, no copy
            share = slice(rank, None, world) if len(rows) >= world else slice(None)
            return DataLoader(rows, sampler=[share], batch_size=None)
        if world > 1:  # DDP: each rank takes its slice of every global batch
            slices = RankSliceBatchSampler(len(rows), self.batch_size, rank, world)
            return DataLoader(rows, sampler=slices, batch_size=None)
        order = BatchSampler(RandomSampler(rows), self.batch_size, drop_last=False)
        return DataLoader(rows, sampler=order, batch_size=None)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")


class ProbeModule(L.LightningModule):
    def __init__(self, num_layers: int, dim: int, num_classes: int, num_variants: int, weight_decays: list[float],
                 kind: str = "linear", hidden: int = 128, lr: float = 1e-2, patience: int = 10, min_delta: float = 1e-3,
                 mean: torch.Tensor | None = None, std: torch.Tensor | None = None, mdl_prefixes: list[int] | None = None,
                 solver_max_iter: int = 100, solver_tol: float = 1e-5):
        super().__init__()
        self.save_hyperparameters(ignore=["mean", "std"])
        prefixes = list(mdl_prefixes or [])
        self.V, self.G, self.C = num_variants, len(weight_decays), num_classes
        self.S = self.V + len(prefixes)
        K = self.S * self.G
        self.full_batch = kind == "linear"
        self.automatic_optimization = not self.full_batch
        self.heads = StackedHeads(num_layers, dim, K, num_classes, kind, hidden)
        if self.full_batch:  # the solver starts from zero; no random init to carry
            with torch.no_grad():
                self.heads.weight.zero_()
        # spec s: which target variant, and the prefix of the MDL order it trains on (-1: all)
        self.register_buffer("spec_variant", torch.tensor(list(range(self.V)) + [0] * len(prefixes), dtype=torch.long))
        self.register_buffer("spec_limit", torch.tensor([-1] * self.V + prefixes, dtype=torch.long))
        self.register_buffer("weight_decay_values", torch.tensor(weight_decays, dtype=torch.float32))
        self.register_buffer("wd", self.weight_decay_values.repeat(self.S))  # [K]
        self.register_buffer("variant_of_head", self.spec_variant.repeat_interleave(self.G))
        # train statistics travel with the probe so a saved probe can read raw features
        self.register_buffer("feature_mean", mean if mean is not None else torch.zeros(num_layers, dim))
        self.register_buffer("feature_std", std if std is not None else torch.ones(num_layers, dim))
        self.register_buffer("best_val_acc", torch.full((num_layers, K), -1.0))
        self.register_buffer("best_val_loss", torch.full((num_layers, K), float("inf")))
        self.best_state = {n: p.detach().clone() for n, p in self.heads.named_parameters()}
        self.stale_epochs = 0
        self.epochs_run = 0
        self.solver_info: dict = {}
        self._val: list = []
        self._test: list = []
        self.results: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ targets per spec

    def _spec_targets(self, y: torch.Tensor, pos: torch.Tensor):
        """[B, S] targets and 0/1 row weights of every spec."""
        target = y[:, self.spec_variant]
        limit = self.spec_limit
        weight = (limit < 0) | (pos.unsqueeze(1) < limit)
        return target, weight.float()

    def _head_targets(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.variant_of_head]  # [B, K]

    def _per_head_loss(self, logits: torch.Tensor, y: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        B, Lyr, K, C = logits.shape
        target = self._head_targets(y).unsqueeze(1).expand(B, Lyr, K)
        loss = F.cross_entropy(logits.reshape(-1, C), target.reshape(-1), reduction="none").view(B, Lyr, K)
        if pos is None:
            return loss.mean(0)  # [L, K]
        weight = self._spec_targets(y, pos)[1].repeat_interleave(self.G, dim=1)  # [B, K]
        return (loss * weight.unsqueeze(1)).sum(0) / weight.sum(0).clamp_min(1.0)

    # ------------------------------------------------------------------ training

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.trainer is None or self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def training_step(self, batch, batch_idx):
        x, y, pos = batch
        if not self.full_batch:
            loss = rescale_for_ranks(self, self._per_head_loss(self.heads(x), y, pos), len(y))  # one device: unchanged
            # heads are independent, so summing their losses trains each on its own objective
            total = loss.sum() + (self.wd * self.heads.sq_norms()).sum()
            self.log("train_loss", loss.mean(), prog_bar=False)
            return total
        target, weight = self._spec_targets(y, pos)
        W, b, info = fit_softmax_heads(x.transpose(0, 1).contiguous(), target, weight, self.weight_decay_values, self.C,
                                       reduce=self._all_reduce, max_iter=self.hparams.solver_max_iter,
                                       tol=self.hparams.solver_tol)
        with torch.no_grad():
            self.heads.weight.copy_(W)
            self.heads.bias.copy_(b)
        self.solver_info = {"iterations": info["iterations"], "unconverged": int((info["stopped"] > self.hparams.solver_max_iter).sum())}
        return None

    def configure_optimizers(self):
        if self.full_batch:
            return None
        return torch.optim.Adam(self.heads.parameters(), lr=self.hparams.lr)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.heads(x)
        self._val.append((logits.argmax(-1), self._per_head_loss(logits, y) * len(y), self._head_targets(y)))

    def on_validation_epoch_end(self):
        preds = torch.cat([p for p, _, _ in self._val])  # [N, L, K]
        target = torch.cat([t for _, _, t in self._val])  # [N, K]
        loss_sum = torch.stack([l for _, l, _ in self._val]).sum(0)
        self._val.clear()
        # every rank evaluates the whole (small) val set: the numbers are the same on every rank
        acc = (preds == target.unsqueeze(1)).float().mean(0)
        loss = loss_sum / len(target)
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
        if self.full_batch or self.stale_epochs >= self.hparams.patience:
            self.trainer.should_stop = True

    def selected_heads(self) -> torch.Tensor:
        """[L, V]: per layer, the task head with the best val score, and the control head
        with the same weight decay (a control task probes the same probe)."""
        acc = self.best_val_acc.view(-1, self.S, self.G)[:, 0]
        loss = self.best_val_loss.view(-1, self.S, self.G)[:, 0]
        score = acc - 1e-6 * torch.tanh(loss)  # accuracy first, lower val loss breaks ties
        g = score.argmax(-1, keepdim=True)  # [L, 1]
        return g + torch.arange(self.V, device=score.device) * self.G

    def on_fit_end(self):
        self.heads.copy_heads_from(self.best_state, torch.ones_like(self.best_val_acc, dtype=torch.bool))

    # ------------------------------------------------------------------ evaluation

    def test_step(self, batch, batch_idx):
        x, y, _ = batch
        self._test.append((self.heads(x).argmax(-1), y))

    def _chosen_metrics(self, preds: torch.Tensor, y: torch.Tensor):
        """Accuracy and macro-F1 [L, V] of the selected heads from predictions [N, L, K]."""
        sel = self.selected_heads()  # [L, V]
        Lyr, V = sel.shape
        chosen = torch.gather(preds, 2, sel.unsqueeze(0).expand(len(preds), Lyr, V))  # [N, L, V]
        # torchmetrics "samplewise" treats dim 0 as independent samples: here (layer, variant)
        p = chosen.permute(1, 2, 0).reshape(Lyr * V, -1)
        t = y[:, : self.V].T.unsqueeze(0).expand(Lyr, V, -1).reshape(Lyr * V, -1)
        acc = multiclass_accuracy(p, t, self.C, average="micro", multidim_average="samplewise")
        f1 = multiclass_f1_score(p, t, self.C, average="macro", multidim_average="samplewise")
        return acc.view(Lyr, V).cpu(), f1.view(Lyr, V).cpu()

    def on_test_epoch_end(self):
        preds = torch.cat([p for p, _ in self._test])  # [N, L, K]
        y = torch.cat([t for _, t in self._test])  # [N, V]
        self._test.clear()
        sel = self.selected_heads()
        acc, f1 = self._chosen_metrics(preds, y)
        self.results = {
            "accuracy": acc,
            "macro_f1": f1,
            "val_accuracy": torch.gather(self.best_val_acc, 1, sel).cpu(),
            "weight_decay": self.wd[sel].cpu(),
        }

    @torch.no_grad()
    def train_statistics(self, data: CachedFeatureData, block_ends: list[int], chunk: int = 1024) -> dict:
        """On the train split: accuracy [L, V] of the selected heads, and MDL block bits [L, B-1, G].

        block_bits[l, b, g] = sum over the rows of block b+1 (MDL positions in
        [ends[b], ends[b+1])) of -log2 p(y) under the block-b head with weight decay g.
        Every rank holds all rows, so this needs no communication.
        """
        rows = data.data["train"]
        B = len(block_ends)
        correct = None
        bits = torch.zeros(self.heads.L, max(B - 1, 0), self.G, dtype=torch.float64)
        ends = torch.tensor(block_ends)
        mdl_heads = torch.arange(self.V * self.G, self.S * self.G)
        for start in range(0, len(rows), chunk):
            x, y, pos = rows[start : start + chunk]  # a view of the layer-major train rows
            x, y, pos = x.to(self.device), y.to(self.device), pos.to(self.device)
            logits = self.heads(x)  # [n, L, K, C]
            hit = (logits.argmax(-1) == self._head_targets(y).unsqueeze(1)).double().sum(0)  # [L, K]
            correct = hit if correct is None else correct + hit
            if B > 1:
                logp = torch.log_softmax(logits[:, :, mdl_heads].double(), -1)  # [n, L, (B-1)*G, C]
                nll = -logp.gather(-1, y[:, 0].view(-1, 1, 1, 1).expand(-1, logp.shape[1], logp.shape[2], 1)).squeeze(-1)
                block = torch.bucketize(pos.cpu(), ends, right=True).to(self.device)  # the block each row is in
                onehot = F.one_hot(block.clamp(0, B - 1), B).double()[:, 1:]  # rows of blocks 1..B-1
                nll = nll.view(len(y), -1, B - 1, self.G)
                bits += torch.einsum("nlbg,nb->lbg", nll, onehot).cpu() / math.log(2)
        sel = self.selected_heads().cpu()
        acc = torch.gather(correct.cpu() / len(rows), 1, sel)
        return {"accuracy": acc.float(), "block_bits": bits}
