#!/usr/bin/python3
"""Side-by-side linear CKA benchmark: strata-worker vs the seed's numpy formula.

Called by bench/cka/run.sh; see bench/cka/README.md. For each D it writes
float32 inputs X (N x D) and Y = tanh(X W) + noise into a scratch directory,
then in the same run times
  - `strata-worker run --kind cka` (wall time, including its .npy load, and
    the compute time it reports), and
  - numpy doing what the seed does: cast to float64, centre the columns, then
    ||Y'X||_F^2 / (||X'X||_F ||Y'Y||_F) with three float64 matrix products,
and prints both, their ratio, and our GFLOP/s (4 N D^2 flops in feature
space) against a measured float64 dgemm ceiling.
"""
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np


def numpy_openblas_core():
    """The core name of the OpenBLAS numpy loaded, read through ctypes."""
    with open("/proc/self/maps") as maps:
        libs = sorted({line.split()[-1] for line in maps if "openblas" in line.split()[-1]})
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
            handle.openblas_get_corename.restype = ctypes.c_char_p
            return handle.openblas_get_corename().decode(), lib
        except (OSError, AttributeError):
            continue
    return "unknown (numpy is not on OpenBLAS?)", ""


def seed_linear_cka(xpath, ypath):
    started = time.perf_counter()
    x = np.load(xpath).astype(np.float64)
    y = np.load(ypath).astype(np.float64)
    loaded = time.perf_counter()
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    dot = np.linalg.norm(y.T @ x) ** 2
    norm_x = np.linalg.norm(x.T @ x)
    norm_y = np.linalg.norm(y.T @ y)
    value = dot / (norm_x * norm_y)
    done = time.perf_counter()
    return value, done - started, done - loaded


def dgemm_ceiling(size=4096):
    a = np.random.default_rng(1).standard_normal((size, size))
    b = np.random.default_rng(2).standard_normal((size, size))
    a[:512, :512] @ b[:512, :512]  # warm up the threads
    started = time.perf_counter()
    a @ b
    return 2.0 * size ** 3 / (time.perf_counter() - started) / 1e9


def main():
    worker = sys.argv[1]
    n = int(os.environ.get("BENCH_N", "10000"))
    dims = [int(d) for d in os.environ.get("BENCH_DIMS", "1024,4096").split(",")]
    core, lib = numpy_openblas_core()
    print("numpy %s on %s (%s), OPENBLAS_CORETYPE=%s" %
          (np.__version__, lib or "?", core, os.environ.get("OPENBLAS_CORETYPE", "(unset)")))
    ceiling = dgemm_ceiling()
    print("dgemm ceiling (numpy float64 4096^3 matmul): %.1f GFLOP/s" % ceiling)
    rng = np.random.default_rng(20261128)
    rows = []
    with tempfile.TemporaryDirectory(prefix="strata-bench-cka-") as scratch:
        for d in dims:
            x = rng.standard_normal((n, d), dtype=np.float32)
            w = (rng.standard_normal((d, d), dtype=np.float32) / np.float32(np.sqrt(d)))
            y = np.tanh(x @ w) + np.float32(0.5) * rng.standard_normal((n, d), dtype=np.float32)
            xpath = os.path.join(scratch, "x_%d.npy" % d)
            ypath = os.path.join(scratch, "y_%d.npy" % d)
            np.save(xpath, x)
            np.save(ypath, y.astype(np.float32))
            del x, y, w

            spec = json.dumps({"x": {"path": xpath}, "y": {"path": ypath}})
            started = time.perf_counter()
            proc = subprocess.run([worker, "run", "--kind", "cka", "--spec", spec],
                                  capture_output=True, text=True)
            ours_wall = time.perf_counter() - started
            if proc.returncode != 0:
                sys.exit("strata-worker failed: %s" % proc.stderr)
            result = json.loads(proc.stdout)
            layer = result["layers"][0]
            ours_compute = layer["compute_seconds"]

            ref, ref_wall, ref_compute = seed_linear_cka(xpath, ypath)
            agree = abs(layer["cka"] - ref) / abs(ref)
            gflops = 4.0 * n * d * d / ours_compute / 1e9
            rows.append((d, ours_wall, ours_compute, ref_wall, ref_compute, gflops, agree,
                         result["blas_core"]))
            os.unlink(xpath)
            os.unlink(ypath)

    print()
    print("N=%d, float32 inputs, linear CKA (feature space), 2 threads" % n)
    print("%6s  %10s %10s  %10s %10s  %7s %7s  %9s %6s  %8s" %
          ("D", "ours wall", "ours comp", "numpy wall", "numpy comp", "x wall", "x comp",
           "ours GF/s", "% ceil", "rel diff"))
    for d, ow, oc, rw, rc, gf, agree, core_name in rows:
        print("%6d  %9.2fs %9.2fs  %9.2fs %9.2fs  %6.2fx %6.2fx  %9.1f %5.0f%%  %8.1e" %
              (d, ow, oc, rw, rc, rw / ow, rc / oc, gf, 100.0 * gf / ceiling, agree))
    print("(x = numpy time / our time; wall includes loading the .npy files; "
          "worker BLAS core: %s)" % rows[0][7])


if __name__ == "__main__":
    main()
