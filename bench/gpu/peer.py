"""bench/gpu/peer.py - the PyTorch side of bench/gpu: the same measurements as
bench_gpu.c, on the same GPU, in plain torch (eager, bf16, SDPA attention).

    python3 peer.py train --shape 1b|7b [--batch 4] [--seq 1024] [--rank 8]
    python3 peer.py predict --shape 1b|7b [--batch 8] [--seq 512]
    python3 peer.py cka [--rows 8000] [--dim 4096]
    python3 peer.py gemm [--tokens 4096]

train: LLaMA with bf16 frozen weights (std 0.02, drawn on the device with a
fixed seed), LoRA r on q_proj and v_proj as two extra matmuls per projection
(A, B in fp32 as PEFT keeps them, scaling alpha/r with alpha 16, B zero at
the start), causal-LM loss in fp32 over every position, backward, gradient
clipping at 1 and torch.optim.AdamW on the adapter. MFU uses bench_gpu.c's
formula (see there): 4 N + 6 N_lora + 12 L seq C flops per token over
989 TFLOP/s.
predict: no_grad forward of a batch, every layer's hidden states pooled at
the last token and copied to the host (what a predict job writes), and the
forward alone.
cka: biased linear CKA of two random float64 (rows, dim) matrices: host to
device copy, column centring and the three Gram-free products in float64.
gemm: torch.matmul on bench_gpu gemm's products (a 7B LoRA step's linear
layers over 4096 tokens: forward x W^T, backward dy W and dy^T x) in bf16,
timed as bench_gpu times them (two warm-up runs, then about 0.2 s of
repetitions). torch writes a bf16 C where strata writes fp32, so its
products move less output; reduced-precision bf16 reductions are turned
off so that it accumulates in fp32 as cuBLAS does for strata.
Prints one JSON object per measurement, as bench_gpu does.
"""
import argparse
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

PEAK_FLOPS = 989e12
SHAPES = {
    "1b": dict(C=2048, FF=5632, L=22, NH=32, NKV=4, V=32000),
    "7b": dict(C=4096, FF=11008, L=32, NH=32, NKV=32, V=32000),
}


def matmul_params(s):
    kvd = s["C"] // s["NH"] * s["NKV"]
    return s["L"] * (2 * s["C"] ** 2 + 2 * s["C"] * kvd + 3 * s["C"] * s["FF"]) + s["V"] * s["C"]


class Llama:
    """Weights as plain tensors; forward written out as the engine's."""

    def __init__(self, s, dev, seed=7):
        g = torch.Generator(device=dev).manual_seed(seed)
        C, FF, L, NH, NKV, V = s["C"], s["FF"], s["L"], s["NH"], s["NKV"], s["V"]
        self.s, self.HS = s, C // NH
        kvd = self.HS * NKV

        def w(*shape):
            return (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(
                torch.bfloat16)

        self.embed = w(V, C)
        self.layers = [dict(wq=w(C, C), wk=w(kvd, C), wv=w(kvd, C), wo=w(C, C), wg=w(FF, C),
                            wu=w(FF, C), wd=w(C, FF), n1=torch.ones(C, device=dev),
                            n2=torch.ones(C, device=dev)) for _ in range(L)]
        self.norm = torch.ones(C, device=dev)
        self.head = w(V, C)
        self.lora = None

    def add_lora(self, r, dev, seed=9):
        g = torch.Generator(device=dev).manual_seed(seed)
        C = self.s["C"]
        kvd = self.HS * self.s["NKV"]
        self.scaling = 16.0 / r
        self.lora = []
        for _ in self.layers:
            ent = {}
            for name, out in (("q", C), ("v", kvd)):
                a = (torch.rand(r, C, generator=g, device=dev) * 2 - 1) / math.sqrt(C)
                ent[name] = (a.requires_grad_(), torch.zeros(out, r, device=dev, requires_grad=True))
            self.lora.append(ent)
        return [t for ent in self.lora for pair in ent.values() for t in pair]

    @staticmethod
    def rmsnorm(x, w, eps=1e-5):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(torch.bfloat16)

    def rope(self, x, T):
        HS = self.HS
        inv = 1.0 / (10000.0 ** (torch.arange(0, HS, 2, device=x.device).float() / HS))
        ang = torch.outer(torch.arange(T, device=x.device).float(), inv)
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
        x1, x2 = x[..., : HS // 2], x[..., HS // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def proj(self, x, w, lora_pair):
        y = x @ w.t()
        if lora_pair is not None:
            a, b = lora_pair
            y = y + ((x.float() @ a.t()) @ b.t() * self.scaling).to(y.dtype)
        return y

    def forward(self, tokens, hook=None):
        B, T = tokens.shape
        NH, NKV, HS = self.s["NH"], self.s["NKV"], self.HS
        x = self.embed[tokens]
        if hook:
            hook(0, x)
        for i, l in enumerate(self.layers):
            lo = self.lora[i] if self.lora else {}
            h = self.rmsnorm(x, l["n1"])
            q = self.proj(h, l["wq"], lo.get("q")).view(B, T, NH, HS).transpose(1, 2)
            k = (h @ l["wk"].t()).view(B, T, NKV, HS).transpose(1, 2)
            v = self.proj(h, l["wv"], lo.get("v")).view(B, T, NKV, HS).transpose(1, 2)
            q, k = self.rope(q, T), self.rope(k, T)
            if NKV != NH:
                k = k.repeat_interleave(NH // NKV, dim=1)
                v = v.repeat_interleave(NH // NKV, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + att.transpose(1, 2).reshape(B, T, NH * HS) @ l["wo"].t()
            h = self.rmsnorm(x, l["n2"])
            x = x + (F.silu(h @ l["wg"].t()) * (h @ l["wu"].t())) @ l["wd"].t()
            if hook and i + 1 < len(self.layers):
                hook(i + 1, x)
        x = self.rmsnorm(x, self.norm)
        if hook:
            hook(len(self.layers), x)
        return x


def emit(obj):
    print(json.dumps(obj), flush=True)


def bench_train(a, dev):
    s = SHAPES[a.shape]
    torch.manual_seed(0)
    m = Llama(s, dev)
    params = m.add_lora(a.rank, dev)
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator(device=dev).manual_seed(11)
    tokens = torch.randint(3, s["V"], (a.batch, a.seq), device=dev, generator=g)
    losses = []
    t_start = None
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            torch.cuda.synchronize()
            t_start = time.perf_counter()
        x = m.forward(tokens)
        logits = (x @ m.head.t()).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, s["V"]), tokens[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        print(f"peer: train {a.shape} step {step}: loss {losses[-1]:.4f}", file=sys.stderr)
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t_start) / a.steps
    n_lora = sum(p.numel() for p in params)
    fpt = 4 * matmul_params(s) + 6 * n_lora + 12 * s["L"] * a.seq * s["C"]
    tok = a.batch * a.seq
    emit(dict(bench="train_lora", impl="torch", shape=a.shape, batch=a.batch, seq=a.seq,
              rank=a.rank, precision="bf16", steps=a.steps, seconds_per_step=sec,
              tokens_per_s=tok / sec, mfu=fpt * tok / sec / PEAK_FLOPS, flops_per_token=fpt,
              loss_first=losses[0], loss_last=losses[-1],
              gpu_memory_used_gib=torch.cuda.max_memory_allocated() / 2 ** 30))


@torch.no_grad()
def bench_predict(a, dev):
    s = SHAPES[a.shape]
    m = Llama(s, dev)
    g = torch.Generator(device=dev).manual_seed(13)
    tokens = torch.randint(3, s["V"], (a.batch, a.seq), device=dev, generator=g)
    for variant in ("predict", "forward_only"):
        pooled = []

        def hook(layer, x):
            pooled.append(x[:, -1, :].float().cpu())

        t_start = None
        for it in range(a.warmup + a.steps):
            if it == a.warmup:
                torch.cuda.synchronize()
                t_start = time.perf_counter()
            pooled.clear()
            m.forward(tokens, hook if variant == "predict" else None)
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t_start) / a.steps
        emit(dict(bench=variant, impl="torch", shape=a.shape, batch=a.batch, seq=a.seq,
                  precision="bf16", seconds_per_batch=sec, sequences_per_s=a.batch / sec,
                  tokens_per_s=a.batch * a.seq / sec,
                  gpu_memory_used_gib=torch.cuda.max_memory_allocated() / 2 ** 30))


def bench_cka(a, dev):
    g = torch.Generator().manual_seed(21)
    x = torch.rand(a.rows, a.dim, generator=g, dtype=torch.float64) * 2 - 1
    y = 0.5 * x + torch.rand(a.rows, a.dim, generator=g, dtype=torch.float64) * 2 - 1

    def cka(xh, yh):
        xd, yd = xh.to(dev), yh.to(dev)
        xd = xd - xd.mean(0, keepdim=True)
        yd = yd - yd.mean(0, keepdim=True)
        xy = (yd.t() @ xd).pow(2).sum()
        xx = (xd.t() @ xd).pow(2).sum().sqrt()
        yy = (yd.t() @ yd).pow(2).sum().sqrt()
        return float(xy / (xx * yy))

    cka(x[:64], y[:64])  # context and cuBLAS warm-up, not timed
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    value = cka(x, y)
    torch.cuda.synchronize()
    emit(dict(bench="cka", impl="torch", rows=a.rows, dim=a.dim, precision="f64",
              seconds=time.perf_counter() - t0, cka=value))


GEMM_LINEARS = (("q/k/v/o", 4096, 4096), ("gate/up", 11008, 4096), ("down", 4096, 11008),
                ("lm_head", 32000, 4096))


def bench_gemm(a, dev):
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    g = torch.Generator(device=dev).manual_seed(31)
    T = a.tokens

    def rand(*shape):
        return (torch.rand(*shape, generator=g, device=dev) * 0.0692 - 0.0346).to(torch.bfloat16)

    def seconds_per(fn):
        fn()
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter() - t0
        n = min(1000, max(3, int(0.2 / t) if t > 0 else 1000))
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n, n

    for name, out, inp in GEMM_LINEARS:
        x, w, dy = rand(T, inp), rand(out, inp), rand(T, out)
        prods = (("fwd", T, out, inp, lambda: torch.matmul(x, w.t())),
                 ("dx", T, inp, out, lambda: torch.matmul(dy, w)),
                 ("dw", out, inp, T, lambda: torch.matmul(dy.t(), x)))
        for what, M, N, K, fn in prods:
            sec, n = seconds_per(fn)
            tflops = 2.0 * M * N * K / sec * 1e-12
            print(f"peer: gemm {name} {what} {M} x {N} x {K}: {tflops:.1f} TFLOP/s",
                  file=sys.stderr)
            emit(dict(bench="gemm", impl="torch", product=f"{name} {what}", M=M, N=N, K=K,
                      precision="bf16", out_dtype="bf16", seconds=sec, tflops=tflops, reps=n))
        del x, w, dy
        torch.cuda.empty_cache()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["train", "predict", "cka", "gemm"])
    p.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--seq", type=int, default=0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=8000)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("peer: no CUDA device for torch", file=sys.stderr)
        sys.exit(77)
    dev = torch.device("cuda:0")
    if a.mode == "train":
        a.batch, a.seq = a.batch or 4, a.seq or 1024
        bench_train(a, dev)
    elif a.mode == "predict":
        a.batch, a.seq = a.batch or 8, a.seq or 512
        bench_predict(a, dev)
    elif a.mode == "gemm":
        bench_gemm(a, dev)
    else:
        bench_cka(a, dev)


if __name__ == "__main__":
    main()
