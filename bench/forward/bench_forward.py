"""bench_forward.py - hidden-state extraction speed: strata's C forward pass
against the same model in PyTorch, in one run, on the same CPU threads and the
same OpenBLAS kernels.

  bench_forward.py DRIVER            the whole bench (run.sh calls this)
  bench_forward.py gen DIR           only write the model and batch into DIR
  bench_forward.py peer DIR ITERS OUT_NPY
                                     only the PyTorch side (its own process,
                                     so its peak RSS is its own)

The model is a random ~100M-parameter LLaMA in Hugging Face layout (config,
float32 model.safetensors), written with tests/reference's safetensors writer;
the batch is B right-padded sequences of up to T token ids. Both sides pool
the last real token of every hidden state 0..L (output_hidden_states
indexing: 0 = embeddings, L = after the final RMSNorm), as a predict job's
last_token pool does, and the two pools must agree within 1e-3 (max abs
difference over max abs value, per hidden-state index).

Environment: BENCH_THREADS (default: nproc), BENCH_ITERS (3 timed forwards
per side per round), BENCH_ROUNDS (2 rounds, each running both sides), BENCH_B (8),
BENCH_T (256), BENCH_NKV (4), BENCH_KEEP (a directory to keep the model in
instead of a temporary one; reused when it already holds one)."""
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "..", "tests", "reference")

# torch and tests/reference's modules, imported only by the gen and peer
# commands: the orchestrator stays small, because on Linux a child forked
# from it inherits its ru_maxrss high-water mark across exec.
torch = F = gen_fixtures = llama_ref = None


def load_torch():
    global torch, F, gen_fixtures, llama_ref
    import torch as _torch
    import torch.nn.functional as _F
    sys.path.insert(0, REF)
    import gen_fixtures as _gen  # the safetensors writer
    import llama_ref as _ref  # HF tensor names
    torch, F, gen_fixtures, llama_ref = _torch, _F, _gen, _ref


def peak_rss_kb():
    """This process's own peak resident set in KiB: VmHWM from
    /proc/self/status (reset by exec), else getrusage's ru_maxrss (which on
    Linux carries the parent's high-water mark over fork and exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

TOL_REL = 1e-3
SEED = 20261128


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v else default


def bench_config(nkv):
    """~100M parameters: C=768, L=12, NH=12, FF=2048, V=32000, tied head."""
    cfg = gen_fixtures.make_config(C=768, L=12, NH=12, NKV=nkv, FF=2048, V=32000, tied=True,
                                   theta=10000.0, eps=1e-5, st_dtype="F32")
    cfg["max_position_embeddings"] = 2048
    return cfg


def make_params(cfg, seed):
    """Random float32 weights at Hugging Face's initializer_range (normal,
    std 0.02); norm weights 1 + 0.1 N (not all ones, so they matter)."""
    g = torch.Generator().manual_seed(seed)
    C, NH, NKV, HS = llama_ref.dims(cfg)
    L, FF, V = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    sd = 0.02

    def rn(*shape, s):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * s

    p = {"embed": rn(V, C, s=sd)}
    p["attn_norm"] = [1.0 + rn(C, s=0.1) for _ in range(L)]
    p["wq"] = [rn(NH * HS, C, s=sd) for _ in range(L)]
    p["wk"] = [rn(NKV * HS, C, s=sd) for _ in range(L)]
    p["wv"] = [rn(NKV * HS, C, s=sd) for _ in range(L)]
    p["wo"] = [rn(C, NH * HS, s=sd) for _ in range(L)]
    p["mlp_norm"] = [1.0 + rn(C, s=0.1) for _ in range(L)]
    p["w_gate"] = [rn(FF, C, s=sd) for _ in range(L)]
    p["w_up"] = [rn(FF, C, s=sd) for _ in range(L)]
    p["w_down"] = [rn(C, FF, s=sd) for _ in range(L)]
    p["final_norm"] = 1.0 + rn(C, s=0.1)
    return p


def batch_lengths(B, T):
    """Most rows full, the last two padded, so the pooled position differs
    per row and padding is exercised on both sides."""
    lens = [T] * B
    if B >= 2:
        lens[-1] = max(1, (3 * T) // 4 + 1)
    if B >= 3:
        lens[-2] = max(1, T - 32)
    return lens


def gen(d, B, T, nkv):
    """Writes config.json, model.safetensors and batch.bin (int32: B, T, B*T
    ids right-padded with 0, B lengths) into d, unless d already holds them
    for the same shapes. Returns the parameter count."""
    os.makedirs(d, exist_ok=True)
    cfg = bench_config(nkv)
    stamp = os.path.join(d, "bench.json")
    want = {"seed": SEED, "cfg": cfg}
    if os.path.exists(stamp):
        with open(stamp) as f:
            have = json.load(f)
        nparams = have.pop("params", 0)
        if have == want and os.path.exists(os.path.join(d, "model.safetensors")):
            write_batch(d, cfg, B, T)
            return nparams
    p = make_params(cfg, SEED)
    named = llama_ref.hf_tensors(p, cfg)
    nparams = sum(t.numel() for _, t in named)
    gen_fixtures.write_json(os.path.join(d, "config.json"), cfg)
    gen_fixtures.write_safetensors(os.path.join(d, "model.safetensors"), named, "F32")
    del p, named
    want["params"] = nparams
    with open(stamp, "w") as f:
        json.dump(want, f)
    write_batch(d, cfg, B, T)
    return nparams


def write_batch(d, cfg, B, T):
    rng = np.random.default_rng(SEED + 1)
    ids = rng.integers(3, cfg["vocab_size"], size=(B, T), dtype=np.int64)
    lens = batch_lengths(B, T)
    for b, n in enumerate(lens):
        ids[b, n:] = 0
    head = np.array([B, T], dtype="<i4")
    with open(os.path.join(d, "batch.bin"), "wb") as f:
        f.write(head.tobytes())
        f.write(ids.astype("<i4").tobytes())
        f.write(np.array(lens, dtype="<i4").tobytes())


def read_batch(d):
    raw = np.fromfile(os.path.join(d, "batch.bin"), dtype="<i4")
    B, T = int(raw[0]), int(raw[1])
    ids = raw[2:2 + B * T].reshape(B, T).astype(np.int64)
    lens = raw[2 + B * T:].astype(np.int64)
    assert lens.shape == (B,)
    return ids, lens


def load_weights(d):
    """float32 tensors straight from model.safetensors: each read into its own
    tensor (one copy, no mmap or whole-file buffer kept)."""
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            assert e["dtype"] == "F32", name
            t = torch.empty(e["shape"], dtype=torch.float32)
            f.seek(base + e["data_offsets"][0])
            f.readinto(memoryview(t.numpy()).cast("B"))
            out[name] = t
    return out


def peer_forward(W, cfg, ids, lens):
    """Hugging Face LlamaModel's eager forward in float32 (the same
    computation as tests/reference/llama_ref.py, without the logits a hidden
    state extraction does not need), returning the last real token of every
    hidden state 0..L stacked as (L+1, B, C)."""
    C, NH, NKV, HS = llama_ref.dims(cfg)
    L, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    B, T = ids.shape
    rep = NH // NKV
    last = lens - 1
    rows = torch.arange(B)

    # LlamaRotaryEmbedding: fp32 inv_freq, angles, cos/sin over positions.
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, HS, 2, dtype=torch.float32) / HS))
    ang = torch.arange(T, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]

    # The 4-D causal + padding mask HF builds for a right-padded batch.
    keep = torch.arange(T)[None, :] < lens[:, None]  # (B, Tk)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal[None] & keep[:, None, :]
    mask = torch.zeros(B, 1, T, T, dtype=torch.float32)
    mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)

    def rms(x, w):
        var = x.pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + eps))

    def rot(x):
        return torch.cat([-x[..., HS // 2:], x[..., :HS // 2]], dim=-1)

    h = F.embedding(ids, W["model.embed_tokens.weight"])
    pooled = [h[rows, last]]
    for i in range(L):
        pre = "model.layers.%d." % i
        x = rms(h, W[pre + "input_layernorm.weight"])
        q = F.linear(x, W[pre + "self_attn.q_proj.weight"]).view(B, T, NH, HS).transpose(1, 2)
        k = F.linear(x, W[pre + "self_attn.k_proj.weight"]).view(B, T, NKV, HS).transpose(1, 2)
        v = F.linear(x, W[pre + "self_attn.v_proj.weight"]).view(B, T, NKV, HS).transpose(1, 2)
        q = q * cos + rot(q) * sin
        k = k * cos + rot(k) * sin
        if rep > 1:  # repeat_kv
            k = k[:, :, None].expand(B, NKV, rep, T, HS).reshape(B, NH, T, HS)
            v = v[:, :, None].expand(B, NKV, rep, T, HS).reshape(B, NH, T, HS)
        s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HS) + mask
        a = torch.softmax(s, dim=-1, dtype=torch.float32)
        o = torch.matmul(a, v).transpose(1, 2).reshape(B, T, NH * HS)
        h = h + F.linear(o, W[pre + "self_attn.o_proj.weight"])
        x = rms(h, W[pre + "post_attention_layernorm.weight"])
        g = F.linear(x, W[pre + "mlp.gate_proj.weight"])
        u = F.linear(x, W[pre + "mlp.up_proj.weight"])
        h = h + F.linear(F.silu(g) * u, W[pre + "mlp.down_proj.weight"])
        if i < L - 1:
            pooled.append(h[rows, last])
    pooled.append(rms(h, W["model.norm.weight"])[rows, last])
    return torch.stack(pooled)


def peer(d, iters, out_npy):
    """The PyTorch side: load, one warm-up, iters timed forwards; writes the
    pool ((L+1)*B, C) float32 and prints one JSON object."""
    threads = env_int("BENCH_THREADS", os.cpu_count() or 1)
    torch.set_num_threads(threads)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    ids_np, lens_np = read_batch(d)
    ids, lens = torch.from_numpy(ids_np), torch.from_numpy(lens_np)
    B, T = ids.shape
    t0 = time.perf_counter()
    W = load_weights(d)
    load_s = time.perf_counter() - t0
    rss_after_load = peak_rss_kb()
    times = []
    with torch.inference_mode():
        out = peer_forward(W, cfg, ids, lens)
        for _ in range(iters):
            a = time.perf_counter()
            out = peer_forward(W, cfg, ids, lens)
            times.append(time.perf_counter() - a)
    L1, _, C = out.shape
    gen_fixtures.write_npy(out_npy, out.reshape(L1 * B, C).numpy())
    blas = [line.strip() for line in torch.__config__.show().splitlines()
            if "BLAS" in line or "CPU capability" in line]
    print(json.dumps({
        "side": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "B": int(B), "T": int(T), "iters": iters,
        "mean_s": sum(times) / len(times), "best_s": min(times),
        "tokens_per_s": B * T * len(times) / sum(times), "best_tokens_per_s": B * T / min(times),
        "load_s": load_s, "rss_after_load_kb": rss_after_load,
        "peak_rss_kb": peak_rss_kb(),
        "iter_s": times,
        "blas_config": [b[b.find("BLAS_INFO"):b.find(",", b.find("BLAS_INFO"))]
                        if "BLAS_INFO" in b else b for b in blas],
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", ""),
    }))


def load_avg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().split()[:3]
    except OSError:
        return []


def agreement(c_npy, t_npy, B):
    """Worst per-layer max |strata - torch| / max |torch| over the pools."""
    a, b = np.load(c_npy), np.load(t_npy)
    assert a.shape == b.shape, (a.shape, b.shape)
    worst = 0.0
    for layer in range(a.shape[0] // B):
        x, y = a[layer * B:(layer + 1) * B], b[layer * B:(layer + 1) * B]
        worst = max(worst, float(np.abs(x - y).max() / np.abs(y).max()))
    return worst, a.shape[0] // B


def run(driver):
    """The whole bench: ROUNDS rounds, each running the C driver and then the
    PyTorch peer (ITERS timed forwards each after a warm-up), so load from
    other work on a shared machine falls on both sides; tokens/s from the
    median iteration of each side over all rounds. Returns 0, or 1 when the
    pools disagree."""
    threads = env_int("BENCH_THREADS", os.cpu_count() or 1)
    iters = env_int("BENCH_ITERS", 3)
    rounds = env_int("BENCH_ROUNDS", 2)
    B, T, nkv = env_int("BENCH_B", 8), env_int("BENCH_T", 256), env_int("BENCH_NKV", 4)
    keep = os.environ.get("BENCH_KEEP", "")
    tmp = None
    if keep:
        d = keep
    else:
        tmp = tempfile.TemporaryDirectory(prefix="strata-bench-forward-")
        d = tmp.name
    try:
        print("load average before: %s" % " ".join(load_avg()), flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.abspath(__file__), "gen", d], check=True)
        with open(os.path.join(d, "bench.json")) as f:
            nparams = json.load(f)["params"]
        print("model: %.1fM parameters (C=768 L=12 NH=12 NKV=%d FF=2048 V=32000, tied, F32 "
              "safetensors) in %s, ready in %.1f s; batch %d x %d, lengths %s"
              % (nparams / 1e6, nkv, d, time.perf_counter() - t0, B, T, batch_lengths(B, T)),
              flush=True)
        env = dict(os.environ)
        env["OPENBLAS_NUM_THREADS"] = str(threads)
        env["OMP_NUM_THREADS"] = str(threads)
        env["BENCH_THREADS"] = str(threads)
        c_npy, t_npy = os.path.join(d, "strata_pool.npy"), os.path.join(d, "torch_pool.npy")
        cs_all, ps_all, worst, L1 = [], [], 0.0, 0
        for r in range(rounds):
            c = subprocess.run([driver, d, os.path.join(d, "batch.bin"), str(iters), c_npy],
                               env=env, check=True, stdout=subprocess.PIPE, text=True)
            cs = json.loads(c.stdout)
            # The PyTorch peer gets the OpenBLAS kernels the worker chose
            # (unless the user set OPENBLAS_CORETYPE for both).
            env.setdefault("OPENBLAS_CORETYPE", cs["blas_core"])
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "peer", d,
                                str(iters), t_npy],
                               env=env, check=True, stdout=subprocess.PIPE, text=True)
            ps = json.loads(p.stdout)
            w, L1 = agreement(c_npy, t_npy, B)
            worst = max(worst, w)
            cs_all.append(cs)
            ps_all.append(ps)
            print("round %d: strata %s s, pytorch %s s per forward"
                  % (r + 1, " ".join("%.3f" % x for x in cs["iter_s"]),
                     " ".join("%.3f" % x for x in ps["iter_s"])), flush=True)
        ok = worst <= TOL_REL
        cs, ps = cs_all[-1], ps_all[-1]
        print("\nagreement: last-token hidden states 0..%d, max |strata - torch| / max |torch| "
              "per layer, worst %.2e over %d rounds (tolerance %.0e): %s"
              % (L1 - 1, worst, rounds, TOL_REL, "ok" if ok else "MISMATCH"))
        print("threads: %d (OpenBLAS %s for both; strata's OpenBLAS threads %d, torch threads %d)"
              % (threads, cs["blas_core"], cs["blas_threads"], ps["threads"]))
        print("torch %s: %s" % (ps["torch"], "; ".join(ps["blas_config"])))
        summary = {}
        print("\n%-8s %10s %10s %10s %10s %8s %12s %12s"
              % ("side", "median s", "best s", "tok/s med", "tok/s best", "load s",
                 "RSS load MiB", "peak RSS MiB"))
        for name, runs in (("strata", cs_all), ("pytorch", ps_all)):
            its = sorted(x for s in runs for x in s["iter_s"])
            med = float(np.median(its))
            summary[name] = {"median_s": med, "best_s": its[0], "tokens_per_s": B * T / med,
                             "best_tokens_per_s": B * T / its[0],
                             "peak_rss_kb": max(s["peak_rss_kb"] for s in runs)}
            print("%-8s %10.3f %10.3f %10.1f %10.1f %8.2f %12.1f %12.1f"
                  % (name, med, its[0], B * T / med, B * T / its[0], runs[-1]["load_s"],
                     runs[-1]["rss_after_load_kb"] / 1024,
                     summary[name]["peak_rss_kb"] / 1024))
        ratio = summary["strata"]["tokens_per_s"] / summary["pytorch"]["tokens_per_s"]
        best_ratio = summary["strata"]["best_tokens_per_s"] / summary["pytorch"]["best_tokens_per_s"]
        print("\ntokens/s counts all %d x %d positions (both sides compute the padding too)."
              % (B, T))
        print("ratio strata / pytorch: %.2fx on median iterations (%d per side), %.2fx on the "
              "best; goal >= 1x, target 2x" % (ratio, iters * rounds, best_ratio))
        op_s = {k: sum(s["op_s"][k] for s in cs_all) / rounds for k in cs["op_s"]}
        timed = sum(s["timed_run_s"] for s in cs_all) / rounds
        print("\nstrata per-op time (one extra timed forward per round, mean %.3f s):" % timed)
        for k, v in sorted(op_s.items(), key=lambda kv: -kv[1]):
            print("  %-16s %8.3f s  %5.1f%%" % (k, v, 100 * v / timed))
        print("\nload average after: %s" % " ".join(load_avg()))
        print("\n" + json.dumps({"strata": cs_all, "pytorch": ps_all, "summary": summary,
                                 "ratio": ratio, "best_ratio": best_ratio,
                                 "agreement_worst_rel": worst}))
        return 0 if ok else 1
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv):
    if len(argv) == 3 and argv[1] == "gen":
        load_torch()
        gen(argv[2], env_int("BENCH_B", 8), env_int("BENCH_T", 256), env_int("BENCH_NKV", 4))
        return 0
    if len(argv) == 5 and argv[1] == "peer":
        load_torch()
        peer(argv[2], int(argv[3]), argv[4])
        return 0
    if len(argv) == 2:
        return run(argv[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
