"""bench_train.py - training speed: strata's train job (the worker's own
`strata-worker run --kind train`) against the same model, batch and optimizer
in PyTorch, in one run, on the same number of CPU threads.

  bench_train.py WORKER        the whole bench (run.sh calls this)

The model: a random LLaMA in Hugging Face layout (config.json, float32
model.safetensors written with tests/reference's safetensors writer), with
the byte-level vocabulary (259 ids: bytes, BOS 256, EOS 257, PAD 258) so that
no tokenizer file is needed and both sides see the same ids: hidden 512,
8 layers, 8 heads, intermediate 1376, tied head (about 25M parameters). The
batch: B examples, each BOS + a prompt of T/2 - 1 random letters + a response
of T/2 - 1 letters + EOS (T ids, no padding); SFT labels (prompt -100). The
dataset holds exactly B examples and batch_size is B, so every optimizer
step of either side sees the same batch (strata shuffles the order of the
rows, which changes nothing but the summation order).

One optimizer step, both sides: forward, token-mean cross-entropy over the
response + EOS (shifted labels), backward, global-norm clipping at 1.0,
AdamW (lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0), constant
schedule. Full fine-tuning trains every weight; LoRA trains PEFT's A/B on
q_proj and v_proj (r 8, alpha 16, dropout 0) with the base frozen,
unmerged on both sides (y = x W^T + (alpha/r) (x A^T) B^T).

strata's time per step: the train job reports its training loop's seconds
(tokens / tokens_per_second), which include the first step's allocations;
the bench runs the job twice, with 1 and with 1 + STEPS optimizer steps, and
divides the difference by STEPS, so loading, tokenizing and writing the
outputs are not counted. PyTorch: one untimed step, then STEPS timed ones.
Attention in PyTorch is F.scaled_dot_product_attention(is_causal=True), its
fastest CPU kernel (Hugging Face's default "sdpa"), where the installed torch
has it (2.0 on), else llama_ref.py's eager softmax; the rest is the eager
LLaMA computation of tests/reference/llama_ref.py in float32.

Check that the two compute the same thing: the first step's loss (before any
update; LoRA's B starts at zero, so the base model's loss for both methods)
must agree within 1e-4 relative.

Each method runs BENCH_ROUNDS rounds, each round strata then PyTorch; the
table shows each side's best round (on a shared machine other load only
adds time), with the load average before the run.

Environment: BENCH_THREADS (2), BENCH_STEPS (5), BENCH_ROUNDS (3), BENCH_B (4),
BENCH_T (128), BENCH_KEEP (a directory to keep the model and dataset in)."""
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.join(HERE, "..", "..", "tests", "reference")

SEED = 20261128
LR = 1e-4
LORA_R, LORA_ALPHA = 8, 16
LOSS_TOL = 1e-4


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v else default


def bench_config(gen_fixtures, T):
    cfg = gen_fixtures.make_config(C=512, L=8, NH=8, NKV=8, FF=1376, V=259, tied=True,
                                   theta=10000.0, eps=1e-5, st_dtype="F32")
    cfg.update({"bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
                "max_position_embeddings": max(512, T)})
    return cfg


def make_params(torch, llama_ref, cfg, seed):
    """Hugging Face's initialisation scale (normal, std 0.02); norm weights
    1 + 0.1 N so that they matter."""
    g = torch.Generator().manual_seed(seed)
    C, NH, NKV, HS = llama_ref.dims(cfg)
    L, FF, V = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]

    def rn(*shape, s=0.02):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * s

    p = {"embed": rn(V, C), "final_norm": 1.0 + rn(C, s=0.1)}
    p["attn_norm"] = [1.0 + rn(C, s=0.1) for _ in range(L)]
    p["wq"] = [rn(NH * HS, C) for _ in range(L)]
    p["wk"] = [rn(NKV * HS, C) for _ in range(L)]
    p["wv"] = [rn(NKV * HS, C) for _ in range(L)]
    p["wo"] = [rn(C, NH * HS) for _ in range(L)]
    p["mlp_norm"] = [1.0 + rn(C, s=0.1) for _ in range(L)]
    p["w_gate"] = [rn(FF, C) for _ in range(L)]
    p["w_up"] = [rn(FF, C) for _ in range(L)]
    p["w_down"] = [rn(C, FF) for _ in range(L)]
    return p


def make_examples(B, T):
    """B (prompt, response) letter strings, T ids each with BOS and EOS."""
    import random
    r = random.Random(SEED)
    n = T // 2 - 1
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(B):
        prompt = "".join(r.choice(letters) for _ in range(n))
        resp = "".join(r.choice(letters) for _ in range(T - 2 - n))
        out.append((prompt, resp))
    return out


def gen(d, B, T):
    """Writes config.json, model.safetensors and data.json into d. Returns
    (cfg, params, examples, parameter count)."""
    import torch
    sys.path.insert(0, REF)
    import gen_fixtures
    import llama_ref
    os.makedirs(d, exist_ok=True)
    cfg = bench_config(gen_fixtures, T)
    p = make_params(torch, llama_ref, cfg, SEED)
    named = llama_ref.hf_tensors(p, cfg)
    nparams = sum(t.numel() for _, t in named)
    gen_fixtures.write_json(os.path.join(d, "config.json"), cfg)
    gen_fixtures.write_safetensors(os.path.join(d, "model.safetensors"), named, "F32")
    ex = make_examples(B, T)
    with open(os.path.join(d, "data.json"), "w") as f:
        json.dump([{"instruction": a, "output": b} for a, b in ex], f)
    return cfg, p, ex, nparams


def spec(d, method, B, steps):
    s = {"base_model": {"path": d}, "dataset": {"path": os.path.join(d, "data.json")},
         "template": "vanilla", "method": method, "learning_rate": LR, "batch_size": B,
         "max_steps": steps, "lr_scheduler": "constant", "cutoff_len": 1 << 16,
         "max_grad_norm": 1.0, "weight_decay": 0, "seed": 1, "save_steps": 0}
    if method == "lora":
        s["lora"] = {"r": LORA_R, "alpha": LORA_ALPHA, "dropout": 0,
                     "targets": ["q_proj", "v_proj"]}
    return s


def run_strata(worker, d, method, B, steps, threads):
    """One train job; returns its result JSON."""
    out = tempfile.mkdtemp(prefix="strata-bench-train-out-")
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    try:
        p = subprocess.run([worker, "run", "--kind", "train", "--spec",
                            json.dumps(spec(d, method, B, steps)), "--out", out],
                           env=env, capture_output=True, text=True)
        if p.returncode != 0:
            sys.exit("strata-worker failed (%d): %s" % (p.returncode, p.stderr[-2000:]))
        return json.loads(p.stdout)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def strata_side(worker, d, method, B, T, steps, threads):
    """ms per optimizer step (difference of a 1-step and a (1+steps)-step job),
    the first loss and the trainable parameter count."""
    loop = []
    for n in (1, 1 + steps):
        r = run_strata(worker, d, method, B, n, threads)
        assert len(r["losses"]) == n, r["losses"]
        loop.append(r["tokens"] / r["tokens_per_second"])
        first = r["losses"][0]
        trainable = r["trainable_parameters"]
    return 1000.0 * (loop[1] - loop[0]) / steps, first, trainable


def torch_side(cfg, p, examples, method, steps, threads):
    """ms per optimizer step of the same training in PyTorch, the first
    loss and the trainable parameter count."""
    import torch
    import torch.nn.functional as F
    sys.path.insert(0, REF)
    import llama_ref
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    C, NH, NKV, HS = llama_ref.dims(cfg)
    L, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    ids, labels = [], []
    for prompt, resp in examples:
        row = [256] + [ord(c) for c in prompt] + [ord(c) for c in resp] + [257]
        ids.append(row)
        labels.append([-100] * (1 + len(prompt)) + row[1 + len(prompt):])
    ids = torch.tensor(ids)
    labels = torch.tensor(labels)
    B, T = ids.shape
    cos, sin = llama_ref.rope_cos_sin(torch.arange(T).unsqueeze(0), HS, cfg["rope_theta"],
                                      torch.float32)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)

    # PyTorch's fused attention where this torch has it (2.0 on), else the
    # eager softmax(q k^T / sqrt(d) + causal mask) v of llama_ref.py.
    sdpa = hasattr(F, "scaled_dot_product_attention")
    bias = torch.zeros(T, T).masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool)),
                                         torch.finfo(torch.float32).min)

    w = {k: ([t.clone().requires_grad_(method == "full") for t in v] if isinstance(v, list)
             else v.clone().requires_grad_(method == "full")) for k, v in p.items()}
    lora = {}
    if method == "lora":
        scale = LORA_ALPHA / LORA_R
        for i in range(L):
            for key, out in (("wq", NH * HS), ("wv", NKV * HS)):
                a = torch.empty(LORA_R, C).uniform_(-1 / math.sqrt(C), 1 / math.sqrt(C))
                lora[(i, key)] = (a.requires_grad_(), torch.zeros(out, LORA_R, requires_grad=True))
        trainable = [t for ab in lora.values() for t in ab]
    else:
        trainable = [t for v in w.values() for t in (v if isinstance(v, list) else [v])]

    def proj(x, i, key):
        y = x @ w[key][i].T
        if (i, key) in lora:
            a, b = lora[(i, key)]
            y = y + scale * ((x @ a.T) @ b.T)
        return y

    def loss_fn():
        h = w["embed"][ids]
        for i in range(L):
            x = llama_ref.rms_norm(h, w["attn_norm"][i], eps)
            q = proj(x, i, "wq").view(B, T, NH, HS).transpose(1, 2)
            k = proj(x, i, "wk").view(B, T, NKV, HS).transpose(1, 2)
            v = proj(x, i, "wv").view(B, T, NKV, HS).transpose(1, 2)
            q = q * cos + llama_ref.rotate_half(q) * sin
            k = k * cos + llama_ref.rotate_half(k) * sin
            if NKV != NH:
                k = k.repeat_interleave(NH // NKV, dim=1)
                v = v.repeat_interleave(NH // NKV, dim=1)
            if sdpa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(HS) + bias, dim=-1)
                o = a @ v
            h = h + proj(o.transpose(1, 2).reshape(B, T, NH * HS), i, "wo")
            x = llama_ref.rms_norm(h, w["mlp_norm"][i], eps)
            h = h + proj(F.silu(proj(x, i, "w_gate")) * proj(x, i, "w_up"), i, "w_down")
        logits = llama_ref.rms_norm(h, w["final_norm"], eps) @ w["embed"].T
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               labels[:, 1:].reshape(-1), ignore_index=-100)

    opt = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first = step()  # untimed: allocations, AdamW's state
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    ms = 1000.0 * (time.perf_counter() - t0) / steps
    return ms, first, sum(t.numel() for t in trainable), "sdpa" if sdpa else "eager"


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench_train.py STRATA_WORKER")
    worker = sys.argv[1]
    threads = env_int("BENCH_THREADS", 2)
    steps = env_int("BENCH_STEPS", 5)
    rounds = env_int("BENCH_ROUNDS", 3)
    B, T = env_int("BENCH_B", 4), env_int("BENCH_T", 128)
    keep = os.environ.get("BENCH_KEEP", "")
    d = keep or tempfile.mkdtemp(prefix="strata-bench-train-")
    try:
        cfg, p, ex, nparams = gen(d, B, T)
        import torch
        print("model: %.1fM parameters (C %d, L %d, FF %d, V %d, tied); batch %d x %d tokens; "
              "%d timed steps x %d rounds (best round); threads %d; torch %s" %
              (nparams / 1e6, cfg["hidden_size"], cfg["num_hidden_layers"],
               cfg["intermediate_size"], cfg["vocab_size"], B, T, steps, rounds, threads,
               torch.__version__))
        try:
            print("load average: %s" % " ".join(open("/proc/loadavg").read().split()[:3]))
        except OSError:
            pass
        print("%-5s %10s %10s %10s %10s %8s %11s %11s" %
              ("", "strata ms", "torch ms", "strata t/s", "torch t/s", "speedup",
               "loss strata", "loss torch"))
        bad = False
        for method in ("full", "lora"):
            # rounds alternate the sides; each side's best round counts, as
            # the machine is shared and other load only ever adds time
            s_ms = t_ms = math.inf
            for _ in range(rounds):
                ms, s_loss, s_tr = strata_side(worker, d, method, B, T, steps, threads)
                s_ms = min(s_ms, ms)
                ms, t_loss, t_tr, attn = torch_side(cfg, p, ex, method, steps, threads)
                t_ms = min(t_ms, ms)
            assert s_tr == t_tr, "trainable parameters: strata %d, torch %d" % (s_tr, t_tr)
            rel = abs(s_loss - t_loss) / abs(t_loss)
            bad |= rel > LOSS_TOL
            print("%-5s %10.1f %10.1f %10.0f %10.0f %7.2fx %11.6f %11.6f%s" %
                  (method, s_ms, t_ms, B * T * 1000 / s_ms, B * T * 1000 / t_ms, t_ms / s_ms,
                   s_loss, t_loss, "  LOSS MISMATCH" if rel > LOSS_TOL else ""))
        print("torch attention: %s" % attn)
        if bad:
            sys.exit("first-step losses differ by more than %g relative" % LOSS_TOL)
    finally:
        if not keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
