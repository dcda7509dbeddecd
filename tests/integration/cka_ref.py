#!/usr/bin/python3
"""Test data and reference CKA values for the integration tests (numpy only).

  cka_ref.py gen X.npy Y.npy --n N --dx DX --dy DY [--dtype float32] [--seed S]
             [--nan-x 3,7] [--nan-y 5] [--noise 0.5] [--massive]
      writes a correlated pair: Y = X @ R + noise (R random DX x DY), X random
      normal; --massive adds +3000 to column 0 of X (LLaMA-like massive
      activation); the listed rows get a NaN in one column.
  cka_ref.py ref X.npy Y.npy [--kernel linear|rbf] [--debiased] [--threshold T]
      prints {"cka": ..., "n": ..., "dropped_rows": ...}.

The formulas are written from their definitions, independently of the C
engine: linear CKA in feature space, the debiased variant and rbf in Gram
space with explicit centring matrices and the unbiased HSIC estimator of
Song et al. (2007).
"""
import argparse
import json
import sys

import numpy as np


def load_pair(px, py):
    """Both inputs as float64 with rows holding a NaN in either dropped."""
    x = np.load(px).astype(np.float64)
    y = np.load(py).astype(np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if x.shape[0] != y.shape[0]:
        raise SystemExit("row counts differ: %d vs %d" % (x.shape[0], y.shape[0]))
    keep = ~(np.isnan(x).any(axis=1) | np.isnan(y).any(axis=1))
    return x[keep], y[keep], int((~keep).sum())


def centred(a):
    return a - a.mean(axis=0, keepdims=True)


def linear_cka(x, y):
    x, y = centred(x), centred(y)
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    return cross / (np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro"))


def rbf_gram(x, threshold):
    """K_ij = exp(-d_ij^2 / (2 t^2 median(d^2))), median over all N^2 entries."""
    sq = np.sum(x * x, axis=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    d2 = np.maximum(d2, 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.exp(-d2 / (2.0 * threshold * threshold * np.median(d2)))


def hsic_biased(k, l):
    """tr(H K H L) with H = I - 11'/n, using H K H = K minus row and column
    means plus the grand mean (O(n^2) instead of n^3 products)."""
    def centre(g):
        return g - g.mean(axis=0, keepdims=True) - g.mean(axis=1, keepdims=True) + g.mean()
    return float(np.sum(centre(k) * centre(l)))


def hsic_unbiased(k, l):
    """Song et al. 2007, HSIC_1 with zeroed Gram diagonals:
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = k.shape[0]
    kt = k.copy()
    lt = l.copy()
    np.fill_diagonal(kt, 0.0)
    np.fill_diagonal(lt, 0.0)
    term1 = float(np.sum(kt * lt.T))  # tr(K~ L~)
    term2 = kt.sum() * lt.sum() / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * float(kt.sum(axis=0) @ lt.sum(axis=1))  # 1'K~ L~1
    return (term1 + term2 - term3) / (n * (n - 3))


def gram_cka(k, l, debiased):
    f = hsic_unbiased if debiased else hsic_biased
    return f(k, l) / np.sqrt(f(k, k) * f(l, l))


def cmd_ref(a):
    x, y, dropped = load_pair(a.x, a.y)
    if a.kernel == "linear" and not a.debiased:
        v = linear_cka(x, y)
    elif a.kernel == "linear":
        xc, yc = centred(x), centred(y)
        v = gram_cka(xc @ xc.T, yc @ yc.T, True)
    else:
        xc, yc = centred(x), centred(y)
        v = gram_cka(rbf_gram(xc, a.threshold), rbf_gram(yc, a.threshold), a.debiased)
    print(json.dumps({"cka": float(v), "n": int(x.shape[0]), "dropped_rows": dropped}))


def rows(s):
    return [int(v) for v in s.split(",") if v != ""]


def cmd_gen(a):
    rng = np.random.default_rng(a.seed)
    x = rng.standard_normal((a.n, a.dx))
    r = rng.standard_normal((a.dx, a.dy)) / np.sqrt(a.dx)
    y = x @ r + a.noise * rng.standard_normal((a.n, a.dy))
    if a.massive:
        x[:, 0] += 3000.0
    for i in rows(a.nan_x):
        x[i, i % a.dx] = np.nan
    for i in rows(a.nan_y):
        y[i, i % a.dy] = np.nan
    np.save(a.x, x.astype(a.dtype))
    np.save(a.y, y.astype(a.dtype))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gen")
    g.add_argument("x")
    g.add_argument("y")
    g.add_argument("--n", type=int, required=True)
    g.add_argument("--dx", type=int, required=True)
    g.add_argument("--dy", type=int, required=True)
    g.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--nan-x", default="")
    g.add_argument("--nan-y", default="")
    g.add_argument("--noise", type=float, default=0.5)
    g.add_argument("--massive", action="store_true")
    r = sub.add_parser("ref")
    r.add_argument("x")
    r.add_argument("y")
    r.add_argument("--kernel", default="linear", choices=["linear", "rbf"])
    r.add_argument("--debiased", action="store_true")
    r.add_argument("--threshold", type=float, default=1.0)
    a = p.parse_args()
    if a.cmd == "gen":
        cmd_gen(a)
    else:
        cmd_ref(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
