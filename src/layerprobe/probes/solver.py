"""Full-batch fits of many L2-regularized softmax regressions at once.

Every layer gets the same K heads, the product of S target specs with G weight decays
(head k = s * G + g). Spec s has its own targets y[:, s] and row weights w[:, s] (0/1
masks: the full train set, or a prefix of it for an MDL block):

    f[l, k](W, b) = sum_i w[i, s] * CE(x[l, i] @ W[l, :, k] + b[l, k], y[i, s]) / N[s]
                    + wd[g] * ||W[l, :, k]||^2,        N[s] = sum_i w[i, s]

Each (layer, head) problem is convex (strictly for wd > 0). They are solved together by
L-BFGS with a line search per (layer, head).

- Layout: the weights and bias of all heads of a layer are one [K, C, d + 1] tensor (column
  d: the bias), so every L-BFGS vector operation is one tensor operation for all layers
  and heads, and the forward and backward products read the features once each.
- Preconditioner: the initial inverse Hessian is (1/2 Sigma_l + (2 wd + eps) I)^-1 on the
  weights (and 2 on the centred features' biases), scaled per head, Sigma_l = X_l' X_l / n:
  Boehning's bound on the curvature of the softmax loss (Boehning 1992), so steps are close
  to Newton steps from the first iteration even on the ill-conditioned features of real
  hidden states. Sigma_l is approximated by a randomized Nystrom factorization of rank r
  (Tropp et al. 2017, "Fixed-rank approximation of a positive-semidefinite matrix from
  streaming data"; as a preconditioner: Frangella, Tropp & Udell 2023, "Randomized Nystrom
  preconditioning"), with the smallest kept eigenvalue standing in for the rest of the
  spectrum; the rank adapts (`_Chunk.preconditioner`), and past d / 2 the exact
  eigendecomposition is used. The sketch costs a fraction of an eigendecomposition. The
  preconditioner only sets how fast the solver converges, never the optimum.
- Logits are linear in the step size, so the line search costs no matmul: an iteration is
  one forward and one backward matmul.

Layers are solved in chunks small enough to stay in the CPU cache over all iterations;
a chunk stops when every (layer, head) in it has converged.

Data parallel: `reduce` sums a tensor over ranks (identity on one device). The losses,
gradients and sketches are sums over rows, so with every rank holding its own rows and
`reduce` an all-reduce, every rank computes the same numbers and takes the same steps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
CHUNK_BYTES = 16 * 2**20  # features of one layer chunk: about half the last-level cache, so they stay there over all iterations
SKETCH_SEED = 0x4C50  # the Nystrom test matrix: the same on every rank and every run


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def exact_eigh(second: torch.Tensor):
    """(U, lam) of symmetric PSD matrices [L, d, d], eigenvalues clamped at 0."""
    try:
        lam, U = torch.linalg.eigh(second)
    except RuntimeError:  # no convergence in float32 on a near-degenerate moment: float64
        lam, U = (t.to(second.dtype) for t in torch.linalg.eigh(second.double()))
    return U, lam.clamp_min(0.0)  # a PSD moment; rounding can make its smallest eigenvalues negative


def nystrom(sketch: torch.Tensor, omega: torch.Tensor):
    """Eigenpairs (U [L, d, r], lam [L, r]) of the rank-r Nystrom approximation of PSD
    matrices A_l from their sketches Y_l = A_l Omega (Tropp et al. 2017, Alg. 3), in the
    sketch's precision: a shift nu of the sketch's rounding size, removed from the eigenvalues
    afterwards, keeps the core positive definite. Eigenvalues within rounding of 0 come out
    as 0 (in float32, ~1e-7 of the largest), which is all a preconditioner needs."""
    Y, om = sketch, omega
    nu = math.sqrt(Y.shape[1]) * torch.finfo(sketch.dtype).eps * torch.linalg.matrix_norm(Y, ord="fro")  # [L]
    for _ in range(4):
        Yn = Y + nu.view(-1, 1, 1) * om
        core = om.transpose(-1, -2) @ Yn
        chol, info = torch.linalg.cholesky_ex(0.5 * (core + core.transpose(-1, -2)))
        if not bool(info.any()):
            break
        nu = torch.where(info > 0, 10 * nu + torch.finfo(Y.dtype).tiny, nu)  # rounding made the core indefinite: shift more
    else:
        raise RuntimeError("Nystrom preconditioner: the sketch's core stayed indefinite")
    B = torch.linalg.solve_triangular(chol, Yn.transpose(-1, -2), upper=False).transpose(-1, -2)  # Yn C^-T
    s2, V = torch.linalg.eigh(B.transpose(-1, -2) @ B)  # B = U S V'
    # a direction of A's null space has s2 = nu up to rounding: eigenvalues below nu cannot be
    # told from 0, so those directions get eigenvalue 0 and no column (dividing by their
    # singular values would only amplify rounding)
    real = s2 > 2 * nu.view(-1, 1)
    U = torch.where(real.unsqueeze(1), (B @ V) / s2.where(real, torch.ones_like(s2)).sqrt().unsqueeze(1), torch.zeros_like(B))
    lam = torch.where(real, s2 - nu.view(-1, 1), torch.zeros_like(s2))
    return U, lam


class _Chunk:
    """The objective of the (layer, head) problems of a few layers (see the module doc).

    Parameters p: [L, K, C, d + 1] (weights, then the bias, per head and class)."""

    def __init__(self, x, target, scale, wd, S, G, C, reduce):
        self.x = x  # [L, n, d] (any row stride)
        self.L, self.n, self.d = x.shape
        self.S, self.G, self.C, self.K = S, G, C, S * G
        self.M = self.K * C  # rows of the products: every (head, class)
        # scale [K, n]: each row's weight / N[s] per head; target [K, C, n]: the one-hot targets
        # times scale. Logits are kept as [L, K, C, n]: the softmax sums run over C slabs of n
        # contiguous rows (fast), not over a last dim of a few classes (~3x slower), and the
        # gradient product r X needs no transpose.
        self.scale, self.target, self.reduce = scale, target, reduce
        self.wd_values = wd
        self.wd = wd.repeat(S)  # [K]
        # 2 wd per (head, column) of the gradient: the weights are decayed, the bias is not
        decay = torch.zeros(self.K, 1, self.d + 1, dtype=x.dtype, device=x.device)
        decay[:, :, : self.d] = 2 * self.wd.view(-1, 1, 1)
        self.decay = decay.unsqueeze(0)

    def shape(self):
        return (self.L, self.K, self.C, self.d + 1)

    def logits(self, p):
        """[L, K, C, d+1] -> logits [L, K, C, n]: one product with the features."""
        flat = p.view(self.L, self.M, self.d + 1)
        z = torch.baddbmm(flat[:, :, self.d :], flat[:, :, : self.d], self.x.transpose(1, 2))
        return z.view(self.L, self.K, self.C, self.n)

    def data_loss(self, z):
        """Weighted mean cross-entropy per (layer, head) [L, K], and the softmax state (exp of
        the shifted logits [L, K, C, n], their sum over classes [L, K, 1, n]) for `gradient`."""
        shifted = z - z.amax(2, keepdim=True)
        e = shifted.exp()
        total = e.sum(2, keepdim=True)
        # sum_i w_i (log sum_c e_ic - shifted_i,y_i) / N, the second term as one dot per head
        data = (total.log().squeeze(2) * self.scale).sum(-1) - (shifted * self.target).sum((2, 3))
        return data, (e, total)

    def penalty(self, p, q):
        """sum over the weights (not the bias) of p * q per (layer, head) -> [L, K]."""
        return (p[..., : self.d] * q[..., : self.d]).sum((2, 3))

    def gradient(self, softmax, p):
        e, total = softmax
        # w_i (softmax_i - onehot_i) / N: the probabilities e / total never need a second exp
        resid = (e * (self.scale.unsqueeze(1) / total)).sub_(self.target).view(self.L, self.M, self.n)
        data = torch.cat([torch.bmm(resid, self.x), resid.sum(2, keepdim=True)], dim=2)
        return self.reduce(data).view(self.shape()).addcmul_(self.decay, p)

    def preconditioner(self, rows: int, rank: int, eps: float):
        """H0 ~ (1/2 Sigma + (2 wd + eps) I)^-1 per (layer, head), and the rank it used.

        The rank starts at `rank` and doubles until the smallest kept eigenvalue is at most
        the smallest regularizer, 1/2 lam_r <= 2 min(wd) + eps: the eigenvalues left out are
        smaller still, so standing in lam_r for them misjudges their curvature by at most 2x
        (the adaptive rank rule of Frangella, Tropp & Udell 2023). The rule reads the sketch's
        own estimate of lam_r, which is optimistic when the spectrum drops sharply right at r
        (seen: features with a 256-dim latent, sketched at rank 256, took 40 iterations where
        the exact preconditioner took 9); that costs iterations, not accuracy. Past half of d
        the exact eigendecomposition is as cheap, and is used instead.
        """
        L, d, S, G, K, M = self.L, self.d, self.S, self.G, self.K, self.M
        sub = self.x[:, : min(rows, self.n)]
        count = self.reduce(torch.tensor([float(sub.shape[1])], dtype=self.x.dtype, device=self.x.device))
        c = (2 * self.wd_values + eps).view(1, G, 1)
        r = min(rank, d)
        while True:
            if 2 * r > d:  # exact: (1/2 Sigma + c I)^-1 = U diag(1 / (lam / 2 + c)) U'
                r = d
                U, lam = exact_eigh(self.reduce(torch.bmm(sub.transpose(1, 2), sub)) / count)
                break
            gen = torch.Generator(device="cpu").manual_seed(SKETCH_SEED + r)
            omega = torch.randn(d, r, generator=gen, dtype=self.x.dtype).to(self.x.device)
            # the sketch Sigma Omega = X' (X Omega) / n: two skinny products, never Sigma itself
            sketch = self.reduce(torch.bmm(sub.transpose(1, 2), torch.matmul(sub, omega))) / count
            U, lam = nystrom(sketch, omega)  # Sigma ~ U diag(lam) U'
            if bool((0.5 * lam.amin(-1) <= c.min()).all()):
                break
            r *= 2
        # the smallest kept eigenvalue stands in for the rest of the spectrum (zero weight when r = d: exact)
        tail = 1.0 / (0.5 * lam.amin(-1).view(L, 1, 1) + c) if r < d else torch.zeros_like(c)  # [L, G, 1]
        # (1/2 Sigma + c I)^-1 = U diag(1 / (lam / 2 + c) - tail) U' + tail I, per weight decay g
        top = (1.0 / (0.5 * lam.unsqueeze(1) + c) - tail)  # [L, G, r]
        top = top.unsqueeze(1).expand(L, S, G, r).reshape(L, K, 1, r)
        tail = tail.unsqueeze(1).expand(L, S, G, 1).reshape(L, K, 1, 1).expand(L, K, self.C, 1).reshape(L, M, 1)
        Ut = U.transpose(1, 2).contiguous()

        def apply(g):
            flat = g.view(L, M, d + 1)
            gw = flat[:, :, :d]
            coef = torch.bmm(gw, U).view(L, K, self.C, r).mul_(top).view(L, M, r)
            weights = torch.baddbmm(tail * gw, coef, Ut)
            # centred features: the bias block of the bound is 1/2, its inverse 2
            return torch.cat([weights, 2.0 * flat[:, :, d:]], dim=2).view(g.shape)

        return apply, r


def fit_softmax_heads(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, wd: torch.Tensor, num_classes: int,
                      reduce: Optional[Reduce] = None, max_iter: int = 100, tol: float = 1e-5, history: int = 5,
                      precond_rows: int = 2048, precond_rank: int = 128, eps: float = 1e-3,
                      chunk_bytes: int = CHUNK_BYTES):
    """Minimize every f[l, k] (module doc); returns (W [L, d, K, C], b [L, K, C], info).

    x [L, n, d] (standardized features of this rank's rows), y [n, S] targets, w [n, S]
    row weights, wd [G]. A (layer, head) stops when its quasi-Newton decrement
    g' H^-1 g / 2, an estimate of how far its loss is above the minimum (nats per example),
    and its last step's decrease are both below `tol`, or when its line search finds no decrease (float precision). info:
    `iterations` (the most any chunk ran), `loss` [L, K], `stopped` [L, K] (iteration at
    which each problem met its criterion; max_iter + 1 if it never did), `precond_rank`
    (the largest rank any chunk's preconditioner needed; d = exact).
    """
    # Confident heads push probabilities far below float32's normal range; denormal arithmetic
    # is 10-100x slower on CPUs, and those values change nothing. Flush them while we solve.
    flushed = torch.set_flush_denormal(True)
    try:
        return _fit(x, y, w, wd, num_classes, reduce or _identity, max_iter, tol, history, precond_rows, precond_rank,
                    eps, chunk_bytes)
    finally:
        if flushed:
            torch.set_flush_denormal(False)


def _fit(x, y, w, wd, num_classes, reduce, max_iter, tol, history, precond_rows, precond_rank, eps, chunk_bytes):
    L, n, d = x.shape
    S, G, C = y.shape[1], len(wd), num_classes
    wd = wd.to(x.dtype)
    w = w.to(x.dtype)
    scale = (w / reduce(w.sum(0)).clamp_min(1.0)).repeat_interleave(G, dim=1).T.contiguous()  # [K, n]
    onehot = torch.nn.functional.one_hot(y, C).to(x.dtype).repeat_interleave(G, dim=1).permute(1, 2, 0)  # [K, C, n]
    target = (onehot * scale.unsqueeze(1)).contiguous()  # the same for every chunk: built once
    # every rank must cut the same chunks: size them from numbers all ranks share
    n_total = int(reduce(torch.tensor([float(n)], dtype=torch.float64, device=x.device)).item())
    per_chunk = max(1, chunk_bytes // max(1, n_total * d * x.element_size()))
    Ws, bs, losses, stops, ranks, iters = [], [], [], [], [], 0
    for start in range(0, L, per_chunk):
        chunk = _Chunk(x[start : start + per_chunk], target, scale, wd, S, G, C, reduce)
        precond, rank = chunk.preconditioner(precond_rows, precond_rank, eps)
        p, f, stopped, it = _lbfgs(chunk, max_iter, tol, history, precond)
        ranks.append(rank)
        Ws.append(p[..., :d].permute(0, 3, 1, 2)), bs.append(p[..., d]), losses.append(f), stops.append(stopped)
        iters = max(iters, it)
    info = {"iterations": iters, "loss": torch.cat(losses), "stopped": torch.cat(stops), "precond_rank": max(ranks)}
    return torch.cat(Ws), torch.cat(bs), info


def _lbfgs(prob: _Chunk, max_iter: int, tol: float, history: int, precond):
    L, K = prob.L, prob.K
    dtype, device = prob.x.dtype, prob.x.device
    p = torch.zeros(prob.shape(), dtype=dtype, device=device)
    z = torch.zeros(L, K, prob.C, prob.n, dtype=dtype, device=device)
    data, softmax = prob.data_loss(z)
    f = prob.reduce(data)  # p = 0: no penalty
    g = prob.gradient(softmax, p)
    Pg = precond(g)
    # history: steps s, gradient changes y, P y (so the two-loop needs no extra solve), 1 / s'y
    hist: list[tuple] = []
    active = torch.ones(L, K, dtype=torch.bool, device=device)
    stopped = torch.full((L, K), max_iter + 1, dtype=torch.long, device=device)
    gamma = torch.ones(L, K, dtype=dtype, device=device)
    decrease = torch.full((L, K), float("inf"), dtype=dtype, device=device)
    per_head = lambda t: t.view(L, K, 1, 1)  # noqa: E731  [L, K] -> broadcast over [L, K, C, d+1] and [L, K, C, n]
    pick = lambda m, a, b: tuple(torch.where(per_head(m), u, v) for u, v in zip(a, b))  # noqa: E731  per head, a where m else b
    dot = lambda a, b: (a * b).sum((2, 3))  # noqa: E731  per-(layer, head) inner product -> [L, K] (a batched matmul is ~4x slower)
    it = 0
    for it in range(1, max_iter + 1):
        # two-loop recursion with H0 = gamma P, every (layer, head) at once
        q, r = g.clone(), Pg.clone()  # r = P q, kept up to date as q changes
        alphas = []
        for s_, y_, Py, rho in reversed(hist):
            a = per_head(rho * dot(s_, q))
            q.sub_(a * y_)
            r.sub_(a * Py)
            alphas.append(a)
        r.mul_(per_head(gamma))
        for (s_, y_, Py, rho), a in zip(hist, reversed(alphas)):
            r.add_((a - per_head(rho * dot(y_, r))) * s_)
        step_dir = r.neg_()
        slope = dot(g, step_dir)
        bad = slope >= 0  # rounding made it no descent direction: use the preconditioned gradient
        if bool(bad.any()):
            step_dir = torch.where(per_head(bad), -Pg, step_dir)
            slope = torch.where(bad, dot(g, step_dir), slope)
        # -slope / 2 = g' H^-1 g / 2 estimates f - min f (the Newton decrement). Early on H is
        # still near the curvature bound, which underestimates the gap of a confident fit, so
        # the last step's actual decrease must be below tol as well.
        done = active & (-0.5 * slope <= tol) & (decrease <= tol)
        stopped.masked_fill_(done, it)
        active &= ~done
        if not bool(active.any()):
            break
        step_dir.mul_(per_head(active))
        # backtracking (Armijo) line search: logits are linear in the step, z + t * (X p + b)
        zp = prob.logits(step_dir)
        pen0, pen1, pen2 = prob.penalty(p, p), 2 * prob.penalty(p, step_dir), prob.penalty(step_dir, step_dir)
        step = active.to(dtype)  # 1 for the heads still solving, 0 (no move) for the others
        tz = z + zp  # the first trial, t = 1: almost always taken
        tdata, new_softmax = prob.data_loss(tz)
        tf = prob.reduce(tdata) + prob.wd * (pen0 + pen1 + pen2)
        ok = active & torch.isfinite(tf) & (tf <= f + 1e-4 * slope)
        new_f, chosen, new_z = torch.where(ok, tf, f), ok.to(dtype), tz
        todo = active & ~ok
        for _ in range(30):
            if not bool(todo.any()):
                break
            step = torch.where(todo, 0.5 * step, step)
            tz = torch.addcmul(z, per_head(step), zp)
            tdata, tsoftmax = prob.data_loss(tz)
            tf = prob.reduce(tdata) + prob.wd * (pen0 + step * pen1 + step * step * pen2)
            ok = todo & torch.isfinite(tf) & (tf <= f + 1e-4 * step * slope)
            new_f, chosen = torch.where(ok, tf, new_f), torch.where(ok, step, chosen)
            new_softmax = pick(ok, tsoftmax, new_softmax)
            new_z = torch.where(per_head(ok), tz, new_z)
            todo &= ~ok
        failed = todo  # no decrease found: as good as float precision allows
        stopped.masked_fill_(failed, it)
        active &= ~failed
        if bool(failed.any()):  # they keep their logits (a head with no step had z + 0: unchanged)
            z = torch.where(per_head(failed), z, new_z)
            softmax = pick(failed, softmax, new_softmax)
        else:
            z, softmax = new_z, new_softmax
        s_ = step_dir.mul_(per_head(chosen))
        p = p + s_
        decrease = f - new_f
        f = new_f
        new_g = prob.gradient(softmax, p)
        new_Pg = precond(new_g)
        y_, Py = new_g - g, new_Pg - Pg
        g, Pg = new_g, new_Pg
        sy = dot(s_, y_)
        keep = active & (sy > 1e-10 * dot(y_, y_).clamp_min(1e-30))
        if bool(keep.any()):
            m = per_head(keep)
            rho = torch.where(keep, 1.0 / sy.where(keep, torch.ones_like(sy)), torch.zeros_like(sy))
            hist.append((s_ * m, y_ * m, Py * m, rho))
            if len(hist) > history:
                hist.pop(0)
            # gamma = s'y / y'Py (Nocedal & Wright eq. 7.20 in the metric of P): the bound P is
            # loose where the fit is confident, and gamma learns by how much
            yPy = dot(y_, Py)
            gamma = torch.where(keep & (yPy > 0), sy / yPy.where(yPy > 0, torch.ones_like(yPy)), gamma)
    return p, f, stopped, it
