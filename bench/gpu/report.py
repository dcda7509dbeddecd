"""bench/gpu/report.py JSONL - the table of bench/gpu/run.sh: each measurement
of strata (bench_gpu) beside PyTorch's (peer.py) on the same GPU, with the
ratio strata / torch of throughputs (above 1: strata is faster), then the
gemm table: each 7B LoRA-step product through gemm.h's cublasGemmEx (ex) and
cublasLt (lt) paths and torch.matmul, in TFLOP/s, with lt / ex (the number
STRATA_GEMM's default waits on) and the faster strata path over torch.
Markdown on stdout. Standard library only."""
import json
import sys

ROWS = [  # (bench, key, shape-or-None, label, metric, unit)
    ("train_lora", "shape", "7b", "LoRA r8 q,v train step, 7B, 4 x 1024", "tokens_per_s", "tokens/s"),
    ("train_lora", "shape", "7b", "  MFU (989 TFLOP/s bf16 peak)", "mfu", ""),
    ("predict", "shape", "7b", "predict 7B, batch 8 x 512 (pooled states to host)", "sequences_per_s", "seq/s"),
    ("forward_only", "shape", "7b", "  forward only, 7B, batch 8 x 512", "sequences_per_s", "seq/s"),
    ("train_lora", "shape", "1b", "LoRA r8 q,v train step, 1.1B, 4 x 1024", "tokens_per_s", "tokens/s"),
    ("train_lora", "shape", "1b", "  MFU (989 TFLOP/s bf16 peak)", "mfu", ""),
    ("cka", None, None, "CKA linear 8000 x 4096 (x2), float64", "seconds", "s"),
]


def gemm_table(recs):
    """The ex / lt / torch rows of bench_gpu gemm and peer.py gemm, if any."""
    ours = [r for r in recs if r.get("bench") == "gemm" and r.get("impl") == "strata"
            and "ex_tflops" in r]
    if not ours:
        return
    torch = {r.get("product"): r for r in recs
             if r.get("bench") == "gemm" and r.get("impl") == "torch" and "tflops" in r}
    print("\n| product (%s, fp32 out) | M x N x K | ex TFLOP/s | lt TFLOP/s | lt / ex "
          "| torch TFLOP/s | strata best / torch |" % ours[0].get("precision", "bf16"))
    print("|---|---|---|---|---|---|---|")
    ex_s = lt_s = 0.0
    for r in ours:
        t = torch.get(r["product"])
        best = max(r["ex_tflops"], r["lt_tflops"])
        tv = t["tflops"] if t else None
        ex_s += r.get("ex_seconds", 0.0)
        lt_s += r.get("lt_seconds", 0.0)
        print("| %s | %d x %d x %d | %.3g | %.3g%s | %.2fx | %s | %s |"
              % (r["product"], r["M"], r["N"], r["K"], r["ex_tflops"], r["lt_tflops"],
                 "" if r.get("lt_algo", True) else " (no Lt algo: ran ex)", r["lt_over_ex"],
                 "%.3g" % tv if tv else "n/a", "%.2fx" % (best / tv) if tv else "n/a"))
    if ex_s > 0 and lt_s > 0:
        # the products' times summed: one of each, as a step runs them per layer kind
        print("\nall products: ex %.2f ms, lt %.2f ms, lt / ex %.3fx (above 1: lt faster; "
              "torch writes bf16 C, strata fp32)" % (ex_s * 1e3, lt_s * 1e3, ex_s / lt_s))


def main():
    recs = []
    with open(sys.argv[1]) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    recs.append(json.loads(line))
                except ValueError:
                    pass

    def find(bench, key, val, impl):
        for r in recs:
            if r.get("bench") == bench and r.get("impl") == impl and (key is None or r.get(key) == val):
                return r
        return None

    print("| measurement | strata | torch | strata / torch |")
    print("|---|---|---|---|")
    for bench, key, val, label, metric, unit in ROWS:
        s, t = find(bench, key, val, "strata"), find(bench, key, val, "torch")
        sv = s.get(metric) if s else None
        tv = t.get(metric) if t else None

        def fmt(v):
            if v is None:
                return "n/a"
            if metric == "mfu":
                return "%.1f%%" % (100 * v)
            return "%.3g %s" % (v, unit)

        if sv is not None and tv:
            # throughputs: strata/torch; times: torch/strata (both: > 1 = strata faster)
            ratio = "%.2fx" % ((tv / sv) if metric == "seconds" else (sv / tv))
        else:
            ratio = "n/a"
        print("| %s | %s | %s | %s |" % (label, fmt(sv), fmt(tv), ratio))
    cka = find("cka", None, None, "strata")
    if cka:
        print("\nCKA: strata GPU %.12f (%s, %.3f s), strata CPU %.12f (%.3f s, %s threads), |diff| %.2g"
              % (cka["cka"], cka["precision"], cka["seconds"], cka["cpu_cka"], cka["cpu_seconds"],
                 cka.get("cpu_threads"), abs(cka["cka"] - cka["cpu_cka"])))
    gemm_table(recs)
    bad = [r for r in recs if "error" in r or "skipped" in r]
    for r in bad:
        print("\n%s: %s" % (r.get("bench"), r.get("error") or r.get("skipped")))
    print("\nratios above 1: strata faster; MFU = (4 N + 6 N_lora + 12 L T C) tokens / (s * 989e12)")


if __name__ == "__main__":
    main()
