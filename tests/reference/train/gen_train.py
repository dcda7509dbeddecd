"""gen_train.py - writes tests/reference/train/fixtures/: the PyTorch ground
truth that strata's C training engine is checked against. Computed in float64
with autograd on the tiny models of tests/reference/fixtures/ (loaded from
their model.safetensors, so the C engine starts from exactly these weights):

  sft_gqa/     masked SFT batch: loss, gradient of every parameter, gradients
               of the hidden states and logits (full fine-tuning)
  sft_tied/    the same kind of batch on the tied-embedding model
  lora_gqa/    the same batch as sft_gqa through a LoRA adapter on q_proj and
               v_proj: loss and the gradient of every lora_A / lora_B
  lora_init/   that adapter as PEFT saves it (adapter_config.json +
               adapter_model.safetensors)
  adamw_full/  5 AdamW optimizer steps (warmup + cosine, clipping, gradient
               accumulation of 2 micro-batches) of full fine-tuning
  adamw_lora/  the same for the LoRA adapter alone
  pretrain/    pretraining mode (every token counted): loss + some gradients

Every part also runs in float32 and records how far that lands from the
float64 truth (expected.json "checks"); the script asserts its own
consistency checks and fails rather than write fixtures that disagree with
themselves. Deterministic: re-running reproduces identical bytes.
Run: /usr/bin/python3 tests/reference/train/gen_train.py
See README.md beside this file for every file's layout and the conventions."""
import json
import math
import os
import shutil
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REF = os.path.dirname(HERE)
sys.path.insert(0, REF)
import gen_fixtures  # noqa: E402
import llama_ref  # noqa: E402

OUT = os.path.join(HERE, "fixtures")
MODELS = os.path.join(REF, "fixtures")
IGNORE = -100
BOS, EOS, PAD = 1, 2, 0
LORA_R, LORA_ALPHA, LORA_TARGETS = 4, 8, ("q_proj", "v_proj")
TOL_REL = 1e-4

torch.set_num_threads(1)


# ---------------------------------------------------------------- models

def load_model(name):
    """Returns (cfg, {HF name: float64 tensor}) of a reference fixture model,
    read back from its safetensors file (the weights a C loader sees)."""
    d = os.path.join(MODELS, name)
    with open(os.path.join(d, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    st = gen_fixtures.read_safetensors(os.path.join(d, "model.safetensors"))
    return cfg, {k: v.to(torch.float64) for k, v in st.items()}


def hf_names(cfg):
    """The model's parameter names in Hugging Face order (lm_head absent when
    tied)."""
    out = ["model.embed_tokens.weight"]
    for i in range(cfg["num_hidden_layers"]):
        out += ["model.layers.%d.%s" % (i, n) for n, _ in llama_ref.LAYER_TENSORS]
    out.append("model.norm.weight")
    if not cfg["tie_word_embeddings"]:
        out.append("lm_head.weight")
    return out


def to_ref_params(named, cfg, lora=None):
    """Builds llama_ref's params dict from HF-named tensors. With lora
    ({(layer, module): (A, B)}), each targeted projection weight becomes
    W + (alpha/r) B A: with dropout 0 this is exactly PEFT's
    y = W x + (alpha/r) B (A x), so autograd gives PEFT's gradients."""
    L = cfg["num_hidden_layers"]
    key_of = {n: k for n, k in llama_ref.LAYER_TENSORS}
    p = {"embed": named["model.embed_tokens.weight"],
         "final_norm": named["model.norm.weight"]}
    for hf, key in llama_ref.LAYER_TENSORS:
        p[key] = []
        for i in range(L):
            w = named["model.layers.%d.%s" % (i, hf)]
            mod = hf.split(".")[1]
            if lora is not None and (i, mod) in lora:
                a, b = lora[(i, mod)]
                w = w + (LORA_ALPHA / LORA_R) * (b @ a)
            p[key].append(w)
    assert set(key_of.values()) <= set(p)
    if not cfg["tie_word_embeddings"]:
        p["lm_head"] = named["lm_head.weight"]
    return p


def lora_name(i, mod, which):
    grp = "self_attn" if mod in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return "base_model.model.model.layers.%d.%s.%s.%s.weight" % (i, grp, mod, which)


def make_lora(cfg, seed):
    """A (r, in) uniform in +-1/sqrt(in) (PEFT's kaiming_uniform_(a=sqrt(5))
    bound), B (out, r) normal * 0.02 (non-zero, unlike PEFT's init, so that
    lora_A gets a gradient). Returns ({(layer, module): (A, B)} float32,
    ordered list of (PEFT name, tensor))."""
    g = torch.Generator().manual_seed(seed)
    C, NH, NKV, HS = llama_ref.dims(cfg)
    out_dim = {"q_proj": NH * HS, "v_proj": NKV * HS}
    lora, named = {}, []
    for i in range(cfg["num_hidden_layers"]):
        for mod in LORA_TARGETS:
            bound = 1.0 / math.sqrt(C)
            a = (torch.rand(LORA_R, C, generator=g, dtype=torch.float32) * 2 - 1) * bound
            b = torch.randn(out_dim[mod], LORA_R, generator=g, dtype=torch.float32) * 0.02
            lora[(i, mod)] = (a, b)
            named += [(lora_name(i, mod, "lora_A"), a), (lora_name(i, mod, "lora_B"), b)]
    return lora, named


# ---------------------------------------------------------------- batches

def sft_example(g, V, n_prompt, n_resp):
    """BOS + n_prompt-1 random prompt ids, then n_resp random response ids and
    EOS. Labels: -100 over the prompt, the ids themselves over response+EOS."""
    prompt = [BOS] + torch.randint(3, V, (n_prompt - 1,), generator=g).tolist()
    resp = torch.randint(3, V, (n_resp,), generator=g).tolist() + [EOS]
    return prompt + resp, [IGNORE] * len(prompt) + resp


def collate(examples, T=None):
    """Right-pads (ids, labels) pairs to T (default: the longest) with
    pad id 0 and label -100. Returns ids, labels, mask (B, T) long tensors."""
    T = T or max(len(x) for x, _ in examples)
    B = len(examples)
    ids = torch.full((B, T), PAD, dtype=torch.long)
    lab = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (x, y) in enumerate(examples):
        ids[b, :len(x)] = torch.tensor(x)
        lab[b, :len(y)] = torch.tensor(y)
        mask[b, :len(x)] = 1
    return ids, lab, mask


def batch_json(ids, lab, mask, prompt_lengths=None):
    out = {"T": ids.shape[1], "lengths": mask.sum(-1).tolist(), "input_ids": ids.tolist(),
           "labels": lab.tolist(), "attention_mask": mask.tolist(),
           "n_counted": int((lab[:, 1:] != IGNORE).sum())}
    if prompt_lengths is not None:
        out["prompt_lengths"] = prompt_lengths
    return out


# ---------------------------------------------------------------- loss

def loss_sum(p, cfg, ids, lab, mask, dtype):
    """HF LlamaForCausalLM's shifted loss as a sum: logits at position t are
    scored against labels[t+1]; labels -100 are skipped. Returns (sum of
    token cross-entropies, number of counted tokens, hidden list, logits)."""
    hidden, logits = llama_ref.forward(p, cfg, ids, mask, dtype=dtype)
    sl = lab[:, 1:]
    keep = sl != IGNORE
    lp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -lp.gather(-1, sl.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    total = (nll * keep.to(dtype)).sum()
    n = int(keep.sum())
    # Same number through torch's own cross_entropy (HF's loss function).
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                           sl.reshape(-1), ignore_index=IGNORE)
    assert abs(float(ce) - float(total) / n) <= 1e-12 * abs(float(ce)) + 1e-15 \
        or dtype == torch.float32
    return total, n, hidden, logits


def leaves(named, names, dtype):
    return {k: named[k].detach().to(dtype).clone().requires_grad_(k in names)
            for k in named}


def rel(a, ref):
    a, ref = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    m = float(ref.abs().max())
    return float((a - ref).abs().max()) / m if m > 0 else float((a - ref).abs().max())


def grads_of(named_base, cfg, ids, lab, mask, dtype, train_names, lora=None, keep_hidden=False):
    """One SFT loss (mean over counted tokens) and its backward. train_names:
    the HF (or PEFT) names to differentiate. Returns (loss, n_counted,
    {name: grad float64}, hidden grads list, logits grad)."""
    if lora is None:
        w = leaves(named_base, set(train_names), dtype)
        p = to_ref_params(w, cfg)
        gsrc = w
    else:
        w = leaves(named_base, set(), dtype)
        ab = {k: (a.to(dtype).clone().requires_grad_(True), b.to(dtype).clone().requires_grad_(True))
              for k, (a, b) in lora.items()}
        p = to_ref_params(w, cfg, ab)
        gsrc = {}
        for (i, mod), (a, b) in ab.items():
            gsrc[lora_name(i, mod, "lora_A")] = a
            gsrc[lora_name(i, mod, "lora_B")] = b
    total, n, hidden, logits = loss_sum(p, cfg, ids, lab, mask, dtype)
    if keep_hidden:
        for h in hidden:
            h.retain_grad()
        logits.retain_grad()
    loss = total / n
    loss.backward()
    grads = {k: gsrc[k].grad.detach().to(torch.float64) for k in train_names}
    if lora is None:
        for k, t in w.items():
            assert (t.grad is not None) == (k in train_names)
    dh = [h.grad.detach().to(torch.float64) for h in hidden] if keep_hidden else None
    dl = logits.grad.detach().to(torch.float64) if keep_hidden else None
    return float(loss), n, grads, dh, dl


def fd_check(named, cfg, batch, grads, lora=None, h=1e-5):
    """Central finite differences, float64, of the mean loss for a few entries
    of every fourth gradient tensor (its largest entry and one fixed index),
    against autograd: an independent check of the saved gradients.
    Returns the largest |fd - autograd| / max|grad of that tensor|."""
    ids, lab, mask = batch
    worst = 0.0
    for idx, name in enumerate(sorted(grads)):
        if idx % 4:
            continue
        g = grads[name]
        flat_pos = [int(g.abs().argmax()), (g.numel() * 7) // 11]
        for pos in flat_pos:
            vals = []
            for sign in (1.0, -1.0):
                if lora is None:
                    w = {k: v.clone() for k, v in named.items()}
                    w[name].view(-1)[pos] += sign * h
                    p = to_ref_params(w, cfg)
                else:
                    ab = {k: (a.to(torch.float64).clone(), b.to(torch.float64).clone())
                          for k, (a, b) in lora.items()}
                    for (i, mod), (a, b) in ab.items():
                        if lora_name(i, mod, "lora_A") == name:
                            a.view(-1)[pos] += sign * h
                        if lora_name(i, mod, "lora_B") == name:
                            b.view(-1)[pos] += sign * h
                    p = to_ref_params(named, cfg, ab)
                with torch.no_grad():
                    total, n, _, _ = loss_sum(p, cfg, ids, lab, mask, torch.float64)
                vals.append(float(total) / n)
            est = (vals[0] - vals[1]) / (2 * h)
            worst = max(worst, abs(est - float(g.view(-1)[pos])) / float(g.abs().max()))
    assert worst < 1e-6, worst
    return worst


# ---------------------------------------------------------------- files

def write_npy(path, t):
    """float32 little-endian .npy in the tensor's own shape (1-D for norm
    weights; strata's npy reader takes 1-D (N,) as N x 1)."""
    np.save(path, np.ascontiguousarray(t.detach().to(torch.float32).numpy(), dtype="<f4"),
            allow_pickle=False)


def fresh_dir(name):
    d = os.path.join(OUT, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    return d


def save_tensors(d, prefix, tensors):
    """Writes {name: tensor} as prefix + name + .npy; returns {name: file}."""
    files = {}
    for k, t in tensors.items():
        f = prefix + k + ".npy"
        write_npy(os.path.join(d, f), t)
        files[k] = f
    return files


# ---------------------------------------------------------------- parts

def sft_batch(cfg, seed, prompt_lengths, resp_lengths):
    g = torch.Generator().manual_seed(seed)
    ex = [sft_example(g, cfg["vocab_size"], p, r) for p, r in zip(prompt_lengths, resp_lengths)]
    return collate(ex)


def check_padding_invariance(named, cfg, ids, lab, mask, loss):
    """The loss must not depend on how far the batch is padded."""
    extra = 3
    B, T = ids.shape
    ids2 = torch.cat([ids, torch.full((B, extra), PAD, dtype=torch.long)], 1)
    lab2 = torch.cat([lab, torch.full((B, extra), IGNORE, dtype=torch.long)], 1)
    mask2 = torch.cat([mask, torch.zeros(B, extra, dtype=torch.long)], 1)
    total, n, _, _ = loss_sum(to_ref_params(named, cfg), cfg, ids2, lab2, mask2, torch.float64)
    e = abs(float(total) / n - loss) / abs(loss)
    assert e < 1e-12, e
    return e


def gen_sft(dirname, model, seed, prompt_lengths, resp_lengths, grad_subset=None,
            keep_hidden=True):
    """Part 1 (and the tied variant): loss + full-FT gradients of one
    masked SFT batch; float32 measured against it."""
    cfg, named = load_model(model)
    ids, lab, mask = sft_batch(cfg, seed, prompt_lengths, resp_lengths)
    names = hf_names(cfg)
    loss, n, grads, dh, dl = grads_of(named, cfg, ids, lab, mask, torch.float64, names,
                                      keep_hidden=keep_hidden)
    loss32, _, grads32, dh32, dl32 = grads_of(named, cfg, ids, lab, mask, torch.float32, names,
                                              keep_hidden=keep_hidden)
    # Padded positions neither count nor influence real ones.
    real = mask.bool().reshape(-1)
    checks = {"padding_invariance_rel": check_padding_invariance(named, cfg, ids, lab, mask, loss),
              "finite_difference_max_rel": fd_check(named, cfg, (ids, lab, mask), grads),
              "f32_loss_rel": abs(loss32 - loss) / abs(loss),
              "f32_grad_max_rel": max(rel(grads32[k], grads[k]) for k in names)}
    d = fresh_dir(dirname)
    keep = names if grad_subset is None else grad_subset
    files = save_tensors(d, "grad_", {k: grads[k] for k in keep})
    exp = {"model": model, "model_dir": "../../../fixtures/" + model,
           "batch": batch_json(ids, lab, mask, prompt_lengths), "loss": loss,
           "grads": files, "grad_shapes": {k: list(grads[k].shape) for k in keep},
           "all_params_saved": grad_subset is None}
    if keep_hidden:
        B, T = ids.shape
        hfiles = []
        for l, g in enumerate(dh):
            flat = g.reshape(B * T, -1)
            assert float(flat[~real].abs().max()) == 0.0
            hfiles.append("dhidden_%d.npy" % l)
            write_npy(os.path.join(d, hfiles[-1]), flat)
        write_npy(os.path.join(d, "dlogits.npy"), dl.reshape(B * T, -1))
        checks["f32_dhidden_max_rel"] = max(rel(a, b) for a, b in zip(dh32, dh))
        checks["f32_dlogits_rel"] = rel(dl32, dl)
        exp["dhidden"] = hfiles
        exp["dlogits"] = "dlogits.npy"
    assert checks["f32_grad_max_rel"] < TOL_REL / 10 and checks["f32_loss_rel"] < TOL_REL / 10
    exp["checks"] = checks
    exp["tolerance"] = {"loss_rel": TOL_REL, "grad_max_abs_err_over_max_abs_ref": TOL_REL}
    gen_fixtures.write_json(os.path.join(d, "expected.json"), exp)
    print("%s: loss %.6f over %d tokens, f32 loss rel %.1e, grad rel %.1e"
          % (dirname, loss, n, checks["f32_loss_rel"], checks["f32_grad_max_rel"]))
    return cfg, named, (ids, lab, mask)


def write_lora_init(cfg, named_lora):
    d = fresh_dir("lora_init")
    gen_fixtures.write_safetensors(os.path.join(d, "adapter_model.safetensors"), named_lora, "F32")
    conf = {"alpha_pattern": {}, "auto_mapping": None,
            "base_model_name_or_path": "strata/tests/reference/gqa", "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
            "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
            "loftq_config": {}, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0,
            "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
            "peft_type": "LORA", "r": LORA_R, "rank_pattern": {}, "revision": None,
            "target_modules": list(LORA_TARGETS), "task_type": "CAUSAL_LM", "use_dora": False,
            "use_rslora": False}
    gen_fixtures.write_json(os.path.join(d, "adapter_config.json"), conf)
    back = gen_fixtures.read_safetensors(os.path.join(d, "adapter_model.safetensors"))
    assert list(back) == [k for k, _ in named_lora]
    for k, t in named_lora:
        assert torch.equal(back[k], t)


def gen_lora(cfg, named, batch, lora, lora_names):
    """Part 2: the sft_gqa batch through the adapter, base frozen."""
    ids, lab, mask = batch
    loss, n, grads, _, _ = grads_of(named, cfg, ids, lab, mask, torch.float64, lora_names,
                                    lora=lora)
    loss32, _, grads32, _, _ = grads_of(named, cfg, ids, lab, mask, torch.float32, lora_names,
                                        lora=lora)
    for k in lora_names:
        assert float(grads[k].abs().max()) > 0, k
    checks = {"f32_loss_rel": abs(loss32 - loss) / abs(loss),
              "f32_grad_max_rel": max(rel(grads32[k], grads[k]) for k in lora_names),
              "finite_difference_max_rel": fd_check(named, cfg, batch, grads, lora=lora)}
    assert checks["f32_grad_max_rel"] < TOL_REL / 10
    d = fresh_dir("lora_gqa")
    files = save_tensors(d, "grad_", grads)
    exp = {"model": "gqa", "model_dir": "../../../fixtures/gqa", "adapter_dir": "../lora_init",
           "batch": "the batch of ../sft_gqa/expected.json", "loss": loss, "n_counted": n,
           "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "scaling": LORA_ALPHA / LORA_R,
                    "dropout": 0.0, "targets": list(LORA_TARGETS)},
           "grads": files, "grad_shapes": {k: list(grads[k].shape) for k in lora_names},
           "checks": checks,
           "tolerance": {"loss_rel": TOL_REL, "grad_max_abs_err_over_max_abs_ref": TOL_REL}}
    gen_fixtures.write_json(os.path.join(d, "expected.json"), exp)
    print("lora_gqa: loss %.6f, f32 grad rel %.1e" % (loss, checks["f32_grad_max_rel"]))


# ---------------------------------------------------------------- optimizer

def hf_lr_lambda(kind, step, total, warmup):
    """Hugging Face transformers' schedule multipliers (get_*_schedule_with_
    warmup), for the optimizer step index step = 0, 1, ... ."""
    if kind == "constant":
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        return 1.0
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if kind == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def no_decay(name):
    """HF Trainer's get_decay_parameter_names: biases and normalisation-layer
    weights get no weight decay; everything else (embeddings, lm_head,
    projections, LoRA A/B) does."""
    return name.endswith("norm.weight") or name.endswith(".bias")


class AdamW64:
    """An independent float64 AdamW written out from torch.optim.AdamW's
    algorithm, to check the torch run (and to document the order)."""

    def __init__(self, params, b1, b2, eps):
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}
        self.b1, self.b2, self.eps, self.t = b1, b2, eps, 0

    def step(self, params, grads, lr, wd_of):
        self.t += 1
        for k, p in params.items():
            g = grads[k]
            p.mul_(1.0 - lr * wd_of(k))
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g * g
            bc1 = 1 - self.b1 ** self.t
            bc2 = 1 - self.b2 ** self.t
            p.sub_((lr / bc1) * self.m[k] / (self.v[k].sqrt() / math.sqrt(bc2) + self.eps))


def micro_batches(cfg, seed, count, B):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ex = []
        for _ in range(B):
            np_ = int(torch.randint(2, 7, (1,), generator=g))
            nr = int(torch.randint(1, 6, (1,), generator=g))
            ex.append(sft_example(g, cfg["vocab_size"], np_, nr))
        out.append(collate(ex))
    return out


def run_adamw(cfg, named, mbs, hp, dtype, lora=None):
    """HF Trainer's loop: per optimizer step, each of the accum micro-batches
    contributes sum-of-token-CE / N_step (N_step = counted tokens of all the
    step's micro-batches) to the accumulated gradient; then
    clip_grad_norm_(max_grad_norm), AdamW step at lr = base * lambda(step),
    scheduler step, zero grads. Returns a record dict and the final trained
    tensors {name: float64}."""
    steps, accum = hp["steps"], hp["accum"]
    if lora is None:
        train = {k: v.detach().to(dtype).clone().requires_grad_(True) for k, v in named.items()}
        frozen = {}
    else:
        frozen = {k: v.detach().to(dtype) for k, v in named.items()}
        train = {}
        for (i, mod), (a, b) in lora.items():
            train[lora_name(i, mod, "lora_A")] = a.detach().to(dtype).clone().requires_grad_(True)
            train[lora_name(i, mod, "lora_B")] = b.detach().to(dtype).clone().requires_grad_(True)
    names = list(train)
    groups = [{"params": [train[k] for k in names if not no_decay(k)], "weight_decay": hp["wd"]},
              {"params": [train[k] for k in names if no_decay(k)], "weight_decay": 0.0}]
    groups = [gr for gr in groups if gr["params"]]
    opt = torch.optim.AdamW(groups, lr=hp["lr"], betas=hp["betas"], eps=hp["eps"],
                            foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: hf_lr_lambda(hp["schedule"], s, steps, hp["warmup"]))
    mine = {k: v.detach().clone() for k, v in train.items()}
    ref_opt = AdamW64(mine, hp["betas"][0], hp["betas"][1], hp["eps"])

    def params_now():
        if lora is None:
            return to_ref_params(train, cfg)
        ab = {}
        for (i, mod) in lora:
            ab[(i, mod)] = (train[lora_name(i, mod, "lora_A")], train[lora_name(i, mod, "lora_B")])
        return to_ref_params(frozen, cfg, ab)

    rec = {"step_loss": [], "micro_loss": [], "micro_counted": [], "lr": [], "grad_norm": [],
           "clip_coef": []}
    for s in range(steps):
        chunk = mbs[s * accum:(s + 1) * accum]
        n_step = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab, _ in chunk)
        step_loss = 0.0
        for ids, lab, mask in chunk:
            total, n, _, _ = loss_sum(params_now(), cfg, ids, lab, mask, dtype)
            (total / n_step).backward()
            step_loss += float(total) / n_step
            rec["micro_loss"].append(float(total) / n)
            rec["micro_counted"].append(n)
        lr = opt.param_groups[0]["lr"]
        assert lr == hp["lr"] * hf_lr_lambda(hp["schedule"], s, steps, hp["warmup"])
        gn = float(torch.nn.utils.clip_grad_norm_([train[k] for k in names], hp["max_grad_norm"]))
        coef = min(1.0, hp["max_grad_norm"] / (gn + 1e-6))
        if dtype == torch.float64:
            clipped = {k: train[k].grad.detach().clone() for k in names}
            ref_opt.step(mine, clipped, lr, lambda k: 0.0 if no_decay(k) else hp["wd"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec["step_loss"].append(step_loss)
        rec["lr"].append(lr)
        rec["grad_norm"].append(gn)
        rec["clip_coef"].append(coef)
    with torch.no_grad():
        first = mbs[:accum]
        n_eval = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab, _ in first)
        rec["eval_loss_after"] = sum(float(loss_sum(params_now(), cfg, i, la, m, dtype)[0])
                                     for i, la, m in first) / n_eval
    final = {k: v.detach().to(torch.float64) for k, v in train.items()}
    if dtype == torch.float64:
        for k in names:
            e = rel(mine[k], final[k])
            assert e < 1e-12, (k, e)
    return rec, final


def accum_equals_big_batch(cfg, named, mbs):
    """With the N_step scaling, two accumulated micro-batches give exactly the
    gradient of one batch holding both (padded to a common length)."""
    w = leaves(named, {"model.layers.0.self_attn.q_proj.weight"}, torch.float64)
    n_step = sum(int((lab[:, 1:] != IGNORE).sum()) for _, lab, _ in mbs[:2])
    for ids, lab, mask in mbs[:2]:
        total, _, _, _ = loss_sum(to_ref_params(w, cfg), cfg, ids, lab, mask, torch.float64)
        (total / n_step).backward()
    g_acc = w["model.layers.0.self_attn.q_proj.weight"].grad.clone()
    T = max(mbs[0][0].shape[1], mbs[1][0].shape[1])

    def pad(t, v):
        return torch.cat([t, torch.full((t.shape[0], T - t.shape[1]), v, dtype=t.dtype)], 1)
    ids = torch.cat([pad(mbs[0][0], PAD), pad(mbs[1][0], PAD)])
    lab = torch.cat([pad(mbs[0][1], IGNORE), pad(mbs[1][1], IGNORE)])
    mask = torch.cat([pad(mbs[0][2], 0), pad(mbs[1][2], 0)])
    _, n, grads, _, _ = grads_of(named, cfg, ids, lab, mask, torch.float64,
                                 ["model.layers.0.self_attn.q_proj.weight"])
    assert n == n_step
    e = rel(g_acc, grads["model.layers.0.self_attn.q_proj.weight"])
    assert e < 1e-12, e
    return e


def gen_adamw(dirname, cfg, named, hp, saved, lora=None, lora_named=None):
    """Part 3: hp's optimizer run in float64 (saved) and float32 (measured)."""
    mbs = micro_batches(cfg, hp["data_seed"], hp["steps"] * hp["accum"], hp["micro_batch_size"])
    rec, final = run_adamw(cfg, named, mbs, hp, torch.float64, lora)
    rec32, final32 = run_adamw(cfg, named, mbs, hp, torch.float32, lora)
    init = dict(lora_named) if lora is not None else named
    upd_err = {}
    for k in final:
        du = final[k] - init[k].to(torch.float64)
        du32 = final32[k] - init[k].to(torch.float64)
        upd_err[k] = float((du32 - du).norm() / du.norm()) if float(du.norm()) > 0 else 0.0
    checks = {
        "accumulation_equals_big_batch_rel": accum_equals_big_batch(cfg, named, mbs)
        if lora is None else None,
        "f32_step_loss_max_rel": max(abs(a - b) / abs(b) for a, b in
                                     zip(rec32["step_loss"], rec["step_loss"])),
        "f32_grad_norm_max_rel": max(abs(a - b) / abs(b) for a, b in
                                     zip(rec32["grad_norm"], rec["grad_norm"])),
        "f32_eval_loss_after_rel": abs(rec32["eval_loss_after"] - rec["eval_loss_after"])
        / abs(rec["eval_loss_after"]),
        "f32_param_max_rel": max(rel(final32[k], final[k]) for k in final),
        "f32_update_l2_rel_max": max(upd_err.values()),
        "f32_update_max_abs_err_over_lr": max(float((final32[k] - final[k]).abs().max())
                                              for k in final) / hp["lr"],
    }
    if lora is not None:
        checks.pop("accumulation_equals_big_batch_rel")
    d = fresh_dir(dirname)
    files = save_tensors(d, "final_", {k: final[k] for k in saved})
    exp = {"model": "gqa", "model_dir": "../../../fixtures/gqa",
           "method": "lora" if lora is not None else "full",
           "hyperparameters": {"learning_rate": hp["lr"], "adam_beta1": hp["betas"][0],
                               "adam_beta2": hp["betas"][1], "adam_epsilon": hp["eps"],
                               "weight_decay": hp["wd"], "lr_scheduler": hp["schedule"],
                               "warmup_steps": hp["warmup"], "max_steps": hp["steps"],
                               "gradient_accumulation_steps": hp["accum"],
                               "micro_batch_size": hp["micro_batch_size"],
                               "max_grad_norm": hp["max_grad_norm"]},
           "no_weight_decay": [k for k in final if no_decay(k)],
           "micro_batches": [batch_json(i, la, m) for i, la, m in mbs],
           "final_params": files,
           "final_shapes": {k: list(final[k].shape) for k in saved},
           "all_trained_params_saved": len(saved) == len(final),
           "checks": checks,
           "tolerance": {"step_loss_rel": TOL_REL, "micro_loss_rel": TOL_REL,
                         "grad_norm_rel": TOL_REL, "eval_loss_after_rel": TOL_REL,
                         "lr_rel": 1e-12,
                         "final_update_l2_rel": 1e-3,
                         "final_param_max_abs_err_over_lr": 0.05}}
    if lora is not None:
        exp["adapter_dir"] = "../lora_init"
    exp.update(rec)
    gen_fixtures.write_json(os.path.join(d, "expected.json"), exp)
    print("%s: step losses %s, grad norms %s, lr %s" % (
        dirname, ["%.5f" % x for x in rec["step_loss"]], ["%.4f" % x for x in rec["grad_norm"]],
        rec["lr"]))
    print("  checks %s" % json.dumps(checks))
    assert checks["f32_step_loss_max_rel"] < TOL_REL / 10
    assert checks["f32_grad_norm_max_rel"] < TOL_REL / 10
    assert checks["f32_update_l2_rel_max"] < 1e-3
    assert checks["f32_update_max_abs_err_over_lr"] < 0.05
    return rec


def gen_pretrain(cfg, named, saved):
    """Part 4: every token counted: labels = input_ids (HF shifts them), no
    padding."""
    g = torch.Generator().manual_seed(777)
    B, T = 2, 12
    ids = torch.randint(3, cfg["vocab_size"], (B, T), generator=g)
    ids[:, 0] = BOS
    lab = ids.clone()
    mask = torch.ones(B, T, dtype=torch.long)
    names = hf_names(cfg)
    loss, n, grads, _, _ = grads_of(named, cfg, ids, lab, mask, torch.float64, names)
    loss32, _, grads32, _, _ = grads_of(named, cfg, ids, lab, mask, torch.float32, names)
    assert n == B * (T - 1)
    checks = {"f32_loss_rel": abs(loss32 - loss) / abs(loss),
              "f32_grad_max_rel": max(rel(grads32[k], grads[k]) for k in names)}
    assert checks["f32_grad_max_rel"] < TOL_REL / 10
    d = fresh_dir("pretrain")
    files = save_tensors(d, "grad_", {k: grads[k] for k in saved})
    exp = {"model": "gqa", "model_dir": "../../../fixtures/gqa",
           "batch": batch_json(ids, lab, mask), "loss": loss, "grads": files,
           "grad_shapes": {k: list(grads[k].shape) for k in saved},
           "all_params_saved": False, "checks": checks,
           "tolerance": {"loss_rel": TOL_REL, "grad_max_abs_err_over_max_abs_ref": TOL_REL}}
    gen_fixtures.write_json(os.path.join(d, "expected.json"), exp)
    print("pretrain: loss %.6f over %d tokens" % (loss, n))


def gen_schedules():
    """HF multipliers for a few schedules, so the C schedule code can be
    checked on its own (warmup_ratio r gives ceil(r * total) warmup steps)."""
    cases = []
    for kind in ("cosine", "linear", "constant"):
        for total, warm in ((10, 0), (10, 3), (7, 2), (100, 10)):
            cases.append({"lr_scheduler": kind, "max_steps": total, "warmup_steps": warm,
                          "multipliers": [hf_lr_lambda(kind, s, total, warm)
                                          for s in range(total)]})
    cases.append({"lr_scheduler": "cosine", "max_steps": 20, "warmup_ratio": 0.1,
                  "warmup_steps": math.ceil(20 * 0.1),
                  "multipliers": [hf_lr_lambda("cosine", s, 20, math.ceil(20 * 0.1))
                                  for s in range(20)]})
    os.makedirs(OUT, exist_ok=True)
    gen_fixtures.write_json(os.path.join(OUT, "schedules.json"), {"cases": cases})


def main():
    os.makedirs(OUT, exist_ok=True)
    cfg, named, batch = gen_sft("sft_gqa", "gqa", 1111, [4, 7, 3], [6, 2, 3])
    gen_sft("sft_tied", "tied", 2222, [5, 2, 6], [3, 7, 1],
            grad_subset=["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.0.mlp.down_proj.weight",
                         "model.layers.1.self_attn.q_proj.weight", "model.norm.weight"],
            keep_hidden=False)
    lora, lora_named = make_lora(cfg, 3333)
    write_lora_init(cfg, lora_named)
    lora_names = [k for k, _ in lora_named]
    gen_lora(cfg, named, batch, lora, lora_names)
    base = {"steps": 5, "accum": 2, "micro_batch_size": 2, "betas": (0.9, 0.999),
            "eps": 1e-8, "wd": 0.01, "schedule": "cosine", "warmup": 2,
            "max_grad_norm": 1.0, "data_seed": 4444}
    gen_adamw("adamw_full", cfg, named, dict(base, lr=1e-3),
              ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.1.input_layernorm.weight", "model.layers.1.self_attn.k_proj.weight",
               "model.layers.2.mlp.down_proj.weight", "model.norm.weight", "lm_head.weight"])
    gen_adamw("adamw_lora", cfg, named, dict(base, lr=1e-2), lora_names, lora=lora,
              lora_named={k: v.to(torch.float64) for k, v in lora_named})
    gen_pretrain(cfg, named, ["model.embed_tokens.weight",
                              "model.layers.0.self_attn.q_proj.weight",
                              "model.norm.weight", "lm_head.weight"])
    gen_schedules()


if __name__ == "__main__":
    main()
