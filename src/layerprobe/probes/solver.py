"""Full-batch fits of many L2-regularized softmax regressions at once.

Every layer gets the same K heads, the product of S target specs with G weight decays
(head k = s * G + g). Spec s has its own targets y[:, s] and row weights w[:, s] (0/1
masks: the full train set, or a prefix of it for an MDL block):

    f[l, k](W, b) = sum_i w[i, s] * CE(x[l, i] @ W[l, :, k] + b[l, k], y[i, s]) / N[s]
                    + wd[g] * ||W[l, :, k]||^2,        N[s] = sum_i w[i, s]

Each (layer, head) problem is convex (strictly for wd > 0). They are solved together by
L-BFGS with a line search per (layer, head). The initial inverse Hessian is the
preconditioner (1/2 Sigma_l + 2 wd I)^-1 scaled per head, Sigma_l = X_l^T X_l / n:
Boehning's bound on the curvature of the softmax loss, so the steps are close to Newton
steps from the first iteration and a fit takes tens of iterations even on the
ill-conditioned features of real hidden states. Logits are linear in the step size, so
the line search costs no matmul: an iteration is one forward and one backward matmul.

Layers are solved in chunks small enough to stay in the CPU cache over all iterations;
a chunk stops when every (layer, head) in it has converged.

Data parallel: `reduce` sums a tensor over ranks (identity on one device). The losses,
gradients and second moments are sums over rows, so with every rank holding its own rows
and `reduce` an all-reduce, every rank computes the same numbers and takes the same steps.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
CHUNK_BYTES = 24 * 2**20  # features of one layer chunk: about what the last-level cache holds


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _dot(aW, ab, bW, bb) -> torch.Tensor:
    """Per-(layer, head) inner product of (W, b) pairs -> [L, K]."""
    return (aW * bW).sum((1, 3)) + (ab * bb).sum(-1)


class _Chunk:
    """The objective of the (layer, head) problems of a few layers (see the module doc)."""

    def __init__(self, x, onehot, scale, wd, S, G, C, reduce):
        self.x = x  # [L, n, d]
        self.xt = x.transpose(1, 2)  # [L, d, n], a view: bmm reads it as fast as a transposed copy
        self.L, self.n, self.d = x.shape
        self.S, self.G, self.C, self.K = S, G, C, S * G
        self.onehot, self.scale, self.reduce = onehot, scale, reduce  # [n, K, C], [n, K]
        self.wd_values = wd
        self.wd = wd.repeat(S)  # [K]

    def forward(self, W):
        return torch.bmm(self.x, W.reshape(self.L, self.d, -1)).view(self.L, self.n, self.K, self.C)

    def data_loss(self, z):
        """Weighted mean cross-entropy per (layer, head), and log-probabilities; z [L, n, K, C]."""
        # log_softmax by hand: ~2x faster than torch.log_softmax over a last dim of a few classes
        shifted = z - z.amax(-1, keepdim=True)
        logp = shifted - shifted.exp().sum(-1, keepdim=True).log()
        nll = -(logp * self.onehot).sum(-1)  # [L, n, K]
        return (nll * self.scale).sum(1), logp

    def gradient(self, logp, W):
        resid = (logp.exp() - self.onehot).mul_(self.scale.unsqueeze(-1))
        data = self.reduce(torch.cat([torch.bmm(self.xt, resid.view(self.L, self.n, -1)).flatten(1),
                                      resid.sum(1).flatten(1)], dim=1))
        split = self.d * self.K * self.C
        gW = data[:, :split].view(self.L, self.d, self.K, self.C) + 2 * self.wd.view(1, 1, -1, 1) * W
        return gW, data[:, split:].view(self.L, self.K, self.C)

    def preconditioner(self, rows: int, eps: float):
        sub = self.x[:, : min(rows, self.n)]
        count = self.reduce(torch.tensor([float(sub.shape[1])], dtype=self.x.dtype, device=self.x.device))
        second = self.reduce(torch.bmm(sub.transpose(1, 2), sub)) / count
        # one eigendecomposition per layer serves every weight decay: (1/2 Sigma + c I)^-1 =
        # U diag(1 / (lambda / 2 + c)) U', so the setup is L eigh instead of L * G Cholesky
        # factors and inverses (~3x cheaper on CPU), and applying it reads one d x d matrix per
        # layer instead of G.
        try:
            lam, U = torch.linalg.eigh(second)
        except RuntimeError:  # no convergence in float32 on a near-degenerate moment: float64
            lam, U = (t.to(second.dtype) for t in torch.linalg.eigh(second.double()))
        lam = lam.clamp_min(0.0)  # a PSD moment; rounding can make its smallest eigenvalues negative
        L, d, S, G, C = self.L, self.d, self.S, self.G, self.C
        scale = (1.0 / (0.5 * lam.unsqueeze(-1) + 2 * self.wd_values + eps)).view(L, d, 1, G, 1)
        Ut = U.transpose(1, 2)

        def apply(gW, gb):
            """(1/2 Sigma + (2 wd + eps) I)^-1 on the weights, 2 on the biases."""
            r = torch.bmm(Ut, gW.reshape(L, d, -1)).view(L, d, S, G, C) * scale
            return torch.bmm(U, r.view(L, d, -1)).view(L, d, S * G, C), 2.0 * gb

        return apply


def fit_softmax_heads(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, wd: torch.Tensor, num_classes: int,
                      reduce: Optional[Reduce] = None, max_iter: int = 100, tol: float = 1e-5, history: int = 5,
                      precond_rows: int = 2048, eps: float = 1e-3, chunk_bytes: int = CHUNK_BYTES):
    """Minimize every f[l, k] (module doc); returns (W [L, d, K, C], b [L, K, C], info).

    x [L, n, d] (standardized features of this rank's rows), y [n, S] targets, w [n, S]
    row weights, wd [G]. A (layer, head) stops when its quasi-Newton decrement
    g' H^-1 g / 2, an estimate of how far its loss is above the minimum (nats per example),
    and its last step's decrease are both below `tol`, or when its line search finds no decrease (float precision). info:
    `iterations` (the most any chunk ran), `loss` [L, K], `stopped` [L, K] (iteration at
    which each problem met its criterion; max_iter + 1 if it never did).
    """
    # Confident heads push probabilities far below float32's normal range; denormal arithmetic
    # is 10-100x slower on CPUs, and those values change nothing. Flush them while we solve.
    flushed = torch.set_flush_denormal(True)
    try:
        return _fit(x, y, w, wd, num_classes, reduce or _identity, max_iter, tol, history, precond_rows, eps, chunk_bytes)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _fit(x, y, w, wd, num_classes, reduce, max_iter, tol, history, precond_rows, eps, chunk_bytes):
    L, n, d = x.shape
    S, G, C = y.shape[1], len(wd), num_classes
    wd = wd.to(x.dtype)
    w = w.to(x.dtype)
    scale = (w / reduce(w.sum(0)).clamp_min(1.0)).repeat_interleave(G, dim=1)  # [n, K]
    onehot = torch.nn.functional.one_hot(y, C).to(x.dtype).repeat_interleave(G, dim=1)  # [n, K, C]
    # every rank must cut the same chunks: size them from numbers all ranks share
    n_total = int(reduce(torch.tensor([float(n)], dtype=torch.float64, device=x.device)).item())
    per_chunk = max(1, chunk_bytes // max(1, n_total * d * x.element_size()))
    Ws, bs, losses, stops, iters = [], [], [], [], 0
    for start in range(0, L, per_chunk):
        chunk = _Chunk(x[start : start + per_chunk], onehot, scale, wd, S, G, C, reduce)
        W, b, f, stopped, it = _lbfgs(chunk, max_iter, tol, history, chunk.preconditioner(precond_rows, eps))
        Ws.append(W), bs.append(b), losses.append(f), stops.append(stopped)
        iters = max(iters, it)
    info = {"iterations": iters, "loss": torch.cat(losses), "stopped": torch.cat(stops)}
    return torch.cat(Ws), torch.cat(bs), info


def _lbfgs(p: _Chunk, max_iter: int, tol: float, history: int, precond):
    L, d, K, C = p.L, p.d, p.K, p.C
    dtype, device = p.x.dtype, p.x.device
    W = torch.zeros(L, d, K, C, dtype=dtype, device=device)
    b = torch.zeros(L, K, C, dtype=dtype, device=device)
    z = torch.zeros(L, p.n, K, C, dtype=dtype, device=device)
    data, logp = p.data_loss(z)
    f = p.reduce(data)  # W = 0: no penalty
    gW, gb = p.gradient(logp, W)
    PgW, Pgb = precond(gW, gb)
    # history: steps s, gradient changes y, and P y (so the two-loop needs no extra solve)
    hist: list[tuple] = []
    active = torch.ones(L, K, dtype=torch.bool, device=device)
    stopped = torch.full((L, K), max_iter + 1, dtype=torch.long, device=device)
    gamma = torch.ones(L, K, dtype=dtype, device=device)
    decrease = torch.full((L, K), float("inf"), dtype=dtype, device=device)
    view4 = lambda t: t.view(L, 1, K, 1)  # noqa: E731  [L, K] -> broadcast over (d, C)
    it = 0
    for it in range(1, max_iter + 1):
        # two-loop recursion with H0 = gamma P, every (layer, head) at once
        qW, qb = gW.clone(), gb.clone()
        rW, rb = PgW.clone(), Pgb.clone()  # P q, kept up to date as q changes
        alphas = []
        for sW, sb, yW, yb, PyW, Pyb, rho in reversed(hist):
            a = rho * _dot(sW, sb, qW, qb)
            qW -= view4(a) * yW
            qb -= a.unsqueeze(-1) * yb
            rW -= view4(a) * PyW
            rb -= a.unsqueeze(-1) * Pyb
            alphas.append(a)
        rW, rb = rW * view4(gamma), rb * gamma.unsqueeze(-1)
        for (sW, sb, yW, yb, PyW, Pyb, rho), a in zip(hist, reversed(alphas)):
            beta = rho * _dot(yW, yb, rW, rb)
            rW += view4(a - beta) * sW
            rb += (a - beta).unsqueeze(-1) * sb
        pW, pb = -rW, -rb
        slope = _dot(gW, gb, pW, pb)
        bad = slope >= 0  # rounding made it no descent direction: use the preconditioned gradient
        if bool(bad.any()):
            pW, pb = torch.where(view4(bad), -PgW, pW), torch.where(bad.unsqueeze(-1), -Pgb, pb)
            slope = torch.where(bad, _dot(gW, gb, pW, pb), slope)
        # -slope / 2 = g' H^-1 g / 2 estimates f - min f (the Newton decrement). Early on H is
        # still near the curvature bound, which underestimates the gap of a confident fit, so
        # the last step's actual decrease must be below tol as well.
        done = active & (-0.5 * slope <= tol) & (decrease <= tol)
        stopped = torch.where(done, it, stopped)
        active &= ~done
        if not bool(active.any()):
            break
        pW, pb = pW * view4(active), pb * active.unsqueeze(-1)
        # backtracking (Armijo) line search: logits are linear in the step, z + t * (X p + b)
        zp = p.forward(pW) + pb.unsqueeze(1)
        pen0, pen1, pen2 = (W * W).sum((1, 3)), 2 * (W * pW).sum((1, 3)), (pW * pW).sum((1, 3))
        step = torch.ones(L, K, dtype=dtype, device=device)
        todo = active.clone()
        new_f, new_logp = f.clone(), None
        chosen = torch.zeros(L, K, dtype=dtype, device=device)
        for _ in range(30):
            tz = z + view4(step) * zp
            tdata, tlogp = p.data_loss(tz)
            tf = p.reduce(tdata) + p.wd * (pen0 + step * pen1 + step * step * pen2)
            ok = todo & torch.isfinite(tf) & (tf <= f + 1e-4 * step * slope)
            new_f = torch.where(ok, tf, new_f)
            chosen = torch.where(ok, step, chosen)
            new_logp = tlogp if new_logp is None else torch.where(ok.view(L, 1, K, 1), tlogp, new_logp)
            todo &= ~ok
            if not bool(todo.any()):
                break
            step = torch.where(todo, 0.5 * step, step)
        failed = todo  # no decrease found: as good as float precision allows
        stopped = torch.where(failed, it, stopped)
        active &= ~failed
        sW, sb = view4(chosen) * pW, chosen.unsqueeze(-1) * pb
        W, b = W + sW, b + sb
        z = z + view4(chosen) * zp
        decrease = f - new_f
        f = new_f
        ngW, ngb = p.gradient(new_logp, W)
        nPgW, nPgb = precond(ngW, ngb)
        yW, yb, PyW, Pyb = ngW - gW, ngb - gb, nPgW - PgW, nPgb - Pgb
        gW, gb, PgW, Pgb = ngW, ngb, nPgW, nPgb
        sy = _dot(sW, sb, yW, yb)
        keep = active & (sy > 1e-10 * _dot(yW, yb, yW, yb).clamp_min(1e-30))
        if bool(keep.any()):
            m4, m3 = view4(keep), keep.unsqueeze(-1)
            rho = torch.where(keep, 1.0 / sy.where(keep, torch.ones_like(sy)), torch.zeros_like(sy))
            hist.append((sW * m4, sb * m3, yW * m4, yb * m3, PyW * m4, Pyb * m3, rho))
            if len(hist) > history:
                hist.pop(0)
            # gamma = s'y / y'Py (Nocedal & Wright eq. 7.20 in the metric of P): the bound P is
            # loose where the fit is confident, and gamma learns by how much
            yPy = _dot(yW, yb, PyW, Pyb)
            gamma = torch.where(keep & (yPy > 0), sy / yPy.where(yPy > 0, torch.ones_like(yPy)), gamma)
    return W, b, f, stopped, it
