#!/usr/bin/python3
"""Demo activations: a "base" and a "tuned" model whose layers drift apart.

  demo_data.py OUTDIR [--layers 12] [--n 2000] [--d 256] [--seed 0]

Writes OUTDIR/base_LL.npy and OUTDIR/tuned_LL.npy (float32, N x D) for
LL = 01..layers. Layer l of the base model is X_l (random normal, with a
massive-activation column offset by +3000 as in LLaMA's hidden states); the
tuned model's is Y_l = X_l @ Q + noise, Q a random rotation and the noise
growing with depth, so CKA is high in early layers and falls with l.
"""
import argparse
import os

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("outdir")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.outdir, exist_ok=True)
    q, _ = np.linalg.qr(rng.standard_normal((a.d, a.d)))
    x = rng.standard_normal((a.n, a.d))
    for layer in range(1, a.layers + 1):
        # Each layer refines the previous one a little, like a residual stream.
        x = x + 0.3 * rng.standard_normal((a.n, a.d))
        base = x.copy()
        base[:, 0] += 3000.0
        noise = 0.12 * layer * layer * rng.standard_normal((a.n, a.d)) / 4.0
        tuned = x @ q + noise * x.std()
        tuned[:, 0] += 3000.0
        np.save(os.path.join(a.outdir, "base_%02d.npy" % layer), base.astype(np.float32))
        np.save(os.path.join(a.outdir, "tuned_%02d.npy" % layer), tuned.astype(np.float32))


if __name__ == "__main__":
    main()
