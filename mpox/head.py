"""The head's mathematics: an L2-penalised softmax regression fit exactly by Newton's method, its penalty
chosen by grouped inner cross-validation, and temperature scaling."""

import contextlib
import functools
import hashlib
import json
import math

import torch
import torch.nn.functional as F

from .data import grouped_folds
from .files import atomic_write
from .system import is_main


def fit_temperature(logits, y):
    """The temperature T minimising the cross-entropy of softmax(logits / T): Newton's method on 1/T, a
    one-dimensional convex problem (Guo et al. 2017, temperature scaling)."""
    inverse = 1.0
    for _ in range(50):
        z = logits * inverse
        p = z.softmax(1)
        mean = (p * logits).sum(1)
        grad = (mean - logits.gather(1, y[:, None])[:, 0]).mean()
        curvature = ((p * logits * logits).sum(1) - mean * mean).mean()
        if abs(grad) < 1e-10 or curvature <= 0:
            break
        inverse = min(max(inverse - grad / curvature, inverse / 4), inverse * 4)
    return 1 / inverse


HEAD_GRID = tuple(float(f'{10 ** (e / 2):.4g}') for e in range(-8, 7))  # the lambdas 'auto' tries: 1e-4 ... 1e3


HEAD_FOLDS, HEAD_FOLD_SEED = 5, 0  # inner folds that choose lambda, drawn with a fixed seed: --seed cannot move it


HEAD_RULE = 'lowest mean out-of-fold log loss'  # how 'auto' picks lambda from the inner folds (choose_weight_decay)


def search_weight_decay(run, grid=HEAD_GRID):
    """lambda for the head by grouped inner cross-validation on the training photos: HEAD_FOLDS folds keeping
    each patient's photos together, the out-of-fold log loss of every lambda of the grid, and the lambda
    choose_weight_decay picks from them. Kept in the feature cache beside the features it was made on, so a
    warm run with the same features skips it. Also returns the out-of-fold logits of each photo's views at
    the choice: the temperature, and the threshold of a run without validation photos, come from them.
    None when there are too few patients of a class to make folds."""
    x, y, views = run.train.x.double(), run.train.y, run.train.x.shape[1]
    folds = inner_folds(run.train.photos)
    used = sorted(set(folds))
    if any(len({y[i].item() for i, f in enumerate(folds) if f != k}) < len(run.classes) for k in used) or len(used) < 2:
        return None  # a fold would train without some class: too few patients
    key = hashlib.sha256(x.float().numpy().tobytes() + json.dumps([y.tolist(), folds, grid, HEAD_RULE]).encode())
    path = run.cache_dir / f'head-search-{key.hexdigest()[:24]}.json' if run.cache_dir else None
    if path and path.exists():
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(path.read_text())
    loss = torch.zeros(len(used), len(grid), dtype=torch.float64)
    oof = torch.zeros(len(grid), len(y), views, len(run.classes), dtype=torch.float64)
    for k, fold in enumerate(used):
        out = torch.tensor([f == fold for f in folds])
        space = RowSpace(x[~out].flatten(0, 1))
        held = space.project(x[out].flatten(0, 1))
        theta = None
        for j in reversed(range(len(grid))):  # strong to weak penalty, each fit starting from the last
            theta = newton_softmax(space.a, y[~out].repeat_interleave(views), len(run.classes), grid[j], theta)
            logits = held @ theta @ helmert(len(run.classes)).T
            loss[k, j] = F.cross_entropy(logits, y[out].repeat_interleave(views))
            oof[j, out] = logits.unflatten(0, (-1, views))
    mean, se = loss.mean(0), loss.std(0) / math.sqrt(len(used))
    choice = choose_weight_decay(mean.tolist())
    search = {'grid': list(grid), 'loss': mean.tolist(), 'se': se.tolist(), 'choice': grid[choice], 'rule': HEAD_RULE, 'folds': len(used), 'oof_logits': oof[choice].tolist()}
    if path and is_main():
        atomic_write(path, lambda f: f.write(json.dumps(search).encode()))
    return search


def choose_weight_decay(loss):
    """Index of the lambda with the lowest mean out-of-fold log loss: the usual rule for a ridge-penalised
    classifier (scikit-learn's LogisticRegressionCV); a one-standard-error rule toward the stronger penalty
    did no better on held-out folds (docs/results.md)."""
    return min(range(len(loss)), key=loss.__getitem__)


def on_grid_edge(search):
    """'lowest' or 'highest' when the chosen lambda is an end of its grid (a wider grid might do better)."""
    grid = search['grid']
    if len(grid) > 1 and search['choice'] in (grid[0], grid[-1]):
        return 'lowest' if search['choice'] == grid[0] else 'highest'
    return None


def inner_folds(photos):
    """The folds that choose the head's weight decay: by patient, stratified, always drawn the same way."""
    return grouped_folds(photos, HEAD_FOLDS, HEAD_FOLD_SEED)


class RowSpace:
    """Training rows standardised and, when they are fewer than the features, written in the coordinates of
    their own span. Under an L2 penalty the optimal weights lie in that span, so fitting there is exact, and
    the problem shrinks from the features' 512-2,048 dimensions to the number of rows."""

    def __init__(self, x):
        self.mean, self.std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)
        z, self.back = (x - self.mean) / self.std, None
        if len(x) <= x.shape[1]:
            values, vectors = torch.linalg.eigh(z @ z.T)  # Z Z^T = U S^2 U^T: much faster than an SVD of Z
            keep = values > values[-1] * 1e-12
            s, u = values[keep].sqrt(), vectors[:, keep]
            z, self.back = u * s, (u / s).T @ z  # the rows' coordinates Z V, and V^T to go back
        self.a = self.coordinates(z)

    def coordinates(self, z):
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)  # the last column carries the bias

    def project(self, x):
        """Other rows in the same coordinates (standardised as the training rows were)."""
        z = (x - self.mean) / self.std
        return self.coordinates(z if self.back is None else z @ self.back.T)

    def linear(self, theta):
        """The fitted (weight, bias) as a Linear on the raw features: the standardisation folded in."""
        P = helmert(theta.shape[1] + 1)
        w = P @ theta[:-1].T
        w = (w if self.back is None else w @ self.back) / self.std  # K x D, per raw feature
        return w.float(), (P @ theta[-1] - w @ self.mean).float()


@functools.cache
def helmert(k):
    """An orthonormal basis (k x k-1) of the logit vectors summing to zero: the penalised optimum has W's rows
    summing to zero, so writing W = P Omega (P: this basis) loses nothing, keeps |W| = |Omega|, and leaves k - 1
    blocks to fit (one for two classes: plain logistic regression)."""
    return torch.linalg.qr(torch.eye(k, dtype=torch.float64) - 1 / k)[0][:, :k - 1]


def newton_softmax(a, y, num_classes, lam, theta=None, tol=1e-9):
    """Minimise mean cross-entropy(softmax(P (a theta)^T)) + lam/2 |theta without its last row|^2 by Newton's
    method with a backtracking line search: a (n x m, last column ones for the bias), y (n) class indices,
    theta (m x K-1). Converged when the gradient's largest entry is below `tol`; convex, so from anywhere."""
    P = helmert(num_classes)
    n, m = a.shape
    onehot = F.one_hot(y, num_classes).to(a.dtype)
    reg = torch.full((m, 1), float(lam), dtype=a.dtype)
    reg[-1] = 0  # the bias is not penalised

    def objective(t):
        logits = a @ t @ P.T
        return (torch.logsumexp(logits, 1) - (logits * onehot).sum(1)).mean() + 0.5 * (reg * t * t).sum()
    theta = torch.zeros(m, P.shape[1], dtype=a.dtype) if theta is None else theta
    f = objective(theta)
    for _ in range(100):
        p = (a @ theta @ P.T).softmax(1)
        grad = a.T @ ((p - onehot) @ P) / n + reg * theta
        if grad.abs().max() < tol:
            break
        pp = p @ P  # the softmax's curvature in the basis, per row: P^T (diag p - p p^T) P
        step = newton_step(a, (torch.einsum('ik,kc,kd->icd', p, P, P) - pp[:, :, None] * pp[:, None, :]) / n, reg,
                           grad)
        decrease, s = (grad * step).sum(), 1.0
        while s > 1e-6:  # backtracking: Newton's full step, or shorter until the objective falls enough
            new = theta - s * step
            f_new = objective(new)
            if f_new <= f - 0.25 * s * decrease:
                break
            s /= 2
        theta, f = new, f_new
    return theta


CHOLESKY_MOST = 1024  # coordinates x classes up to which newton_step forms the Hessian (docs/method.md)


def newton_step(a, w, reg, grad):
    """H^-1 grad for the Hessian H = a^T w a + reg (w: per-row curvature blocks): by Cholesky for small problems
    (the usual few hundred coordinates: fastest), by conjugate gradients preconditioned with H's diagonal for
    large ones, where forming H would cost rows x coordinates^2."""
    m, q = grad.shape
    if m * q <= CHOLESKY_MOST:
        hess = torch.cat([torch.cat([(a.T * w[:, c, d]) @ a for d in range(q)], 1) for c in range(q)], 0)
        hess.diagonal().add_(reg.repeat(q, 1)[:, 0] + 1e-12)
        return torch.cholesky_solve(grad.T.reshape(-1, 1), torch.linalg.cholesky(hess)).reshape(q, m).T
    diag = (a * a).T @ torch.diagonal(w, dim1=1, dim2=2) + reg + 1e-12
    x, r = torch.zeros_like(grad), grad.clone()
    z = r / diag
    d, rz, goal = z, (r * z).sum(), min(0.1, grad.norm()) * grad.norm()  # inexact Newton: superlinear
    for _ in range(1000):
        hd = a.T @ torch.einsum('icd,id->ic', w, a @ d) + reg * d
        step = rz / (d * hd).sum()
        x, r = x + step * d, r - step * hd
        if r.norm() <= goal:
            break
        z = r / diag
        rz, rz_old = (r * z).sum(), rz
        d = z + rz / rz_old * d
    return x
