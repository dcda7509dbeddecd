"""gen_fixtures.py - writes tests/reference/fixtures/: tiny random LLaMA models
in Hugging Face layout (plus llama2.c exports), their expected hidden states
and logits for a padded batch of prompts, and a Llama-2-kind tokenizer with
encoding cases. Deterministic (fixed seeds): re-running reproduces identical
files. Run: /usr/bin/python3 tests/reference/gen_fixtures.py
See README.md for every file's layout."""
import json
import os
import re
import struct
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import llama_ref  # noqa: E402
import tokenizer_ref  # noqa: E402

OUT = os.path.join(HERE, "fixtures")
LENGTHS = [7, 3, 11, 1, 5]  # random-prompt batch of the gqa, tied and sharded models
TOL_REL = 1e-4
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
TORCH_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}

torch.set_num_threads(1)


def write_json(path, obj):
    """Pretty JSON, keys sorted, lists of plain numbers kept on one line."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False)
    text = re.sub(r"\[([-\d\s,.eE+]*)\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def write_npy(path, arr):
    """Writes a 2-D float32 .npy (the shape strata's npy reader takes)."""
    arr = np.ascontiguousarray(arr, dtype="<f4")
    assert arr.ndim == 2
    np.save(path, arr, allow_pickle=False)


def tensor_bytes(t, st_dtype):
    t = t.detach().contiguous()
    if st_dtype == "F32":
        return t.to(torch.float32).numpy().astype("<f4").tobytes()
    if st_dtype == "F16":
        return t.to(torch.float16).numpy().astype("<f2").tobytes()
    return t.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()


def write_safetensors(path, named, st_dtype):
    """Writes named (list of (name, tensor)) as one safetensors file: u64 LE
    header length, JSON header (padded with spaces to a multiple of 8), then
    the tensors' bytes in list order. Returns the data bytes written."""
    header = {"__metadata__": {"format": "pt"}}
    blobs = []
    off = 0
    for name, t in named:
        b = tensor_bytes(t, st_dtype)
        header[name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)
    return off


def read_safetensors(path):
    """Parses a safetensors file back with numpy only (independently of the
    writer) and returns {name: float32 tensor}; asserts the layout rules the
    README states (8-aligned data, contiguous offsets, sizes match shapes)."""
    raw = open(path, "rb").read()
    n = struct.unpack_from("<Q", raw, 0)[0]
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    data = raw[8 + n:]
    size = {"F32": 4, "F16": 2, "BF16": 2}
    out = {}
    pos = 0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        assert b == pos and end - b == size[e["dtype"]] * int(np.prod(e["shape"]))
        pos = end
        chunk = data[b:end]
        if e["dtype"] == "F32":
            a = np.frombuffer(chunk, "<f4")
        elif e["dtype"] == "F16":
            a = np.frombuffer(chunk, "<f2").astype(np.float32)
        else:
            a = (np.frombuffer(chunk, "<u2").astype(np.uint32) << 16).view(np.float32)
        out[name] = torch.from_numpy(a.copy()).view(e["shape"])
    assert pos == len(data), "%s: trailing bytes" % path
    return out


def make_config(C, L, NH, NKV, FF, V, tied, theta, eps, st_dtype):
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": C,
        "intermediate_size": FF,
        "max_position_embeddings": 64,
        "model_type": "llama",
        "num_attention_heads": NH,
        "num_hidden_layers": L,
        "num_key_value_heads": NKV,
        "pad_token_id": 0,
        "rms_norm_eps": eps,
        "rope_scaling": None,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
        "torch_dtype": TORCH_DTYPE_NAME[st_dtype],
        "use_cache": True,
        "vocab_size": V,
    }


def make_params(cfg, seed):
    """Random float32 weights: normal, scaled 0.05-0.5; norm weights 1 + 0.1 N."""
    g = torch.Generator().manual_seed(seed)
    C, NH, NKV, HS = llama_ref.dims(cfg)
    L, FF, V = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]

    def rn(*shape, s):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * s

    p = {"embed": rn(V, C, s=0.5)}
    p["attn_norm"] = [1.0 + rn(C, s=0.1) for _ in range(L)]
    p["wq"] = [rn(NH * HS, C, s=0.1) for _ in range(L)]
    p["wk"] = [rn(NKV * HS, C, s=0.1) for _ in range(L)]
    p["wv"] = [rn(NKV * HS, C, s=0.08) for _ in range(L)]
    p["wo"] = [rn(C, NH * HS, s=0.05) for _ in range(L)]
    p["mlp_norm"] = [1.0 + rn(C, s=0.1) for _ in range(L)]
    p["w_gate"] = [rn(FF, C, s=0.08) for _ in range(L)]
    p["w_up"] = [rn(FF, C, s=0.08) for _ in range(L)]
    p["w_down"] = [rn(C, FF, s=0.05) for _ in range(L)]
    p["final_norm"] = 1.0 + rn(C, s=0.1)
    if not cfg["tie_word_embeddings"]:
        p["lm_head"] = rn(V, C, s=0.05)
    return p


def round_params(p, st_dtype):
    """The weights as a loader sees them after the storage round trip."""
    dt = ST_DTYPES[st_dtype]

    def r(t):
        return t.to(dt).to(torch.float32)
    return {k: (r(v) if torch.is_tensor(v) else [r(t) for t in v]) for k, v in p.items()}


def make_batch(cfg, seed):
    """Random prompts of LENGTHS, token ids in [3, V)."""
    g = torch.Generator().manual_seed(seed)
    return pad_batch(cfg, [torch.randint(3, cfg["vocab_size"], (n,), generator=g).tolist()
                           for n in LENGTHS])


def pad_batch(cfg, seqs):
    """Right-pads token id lists with pad_token_id; returns (ids, mask)."""
    T = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), T), cfg["pad_token_id"], dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for b, q in enumerate(seqs):
        ids[b, :len(q)] = torch.tensor(q, dtype=torch.long)
        mask[b, :len(q)] = 1
    return ids, mask


def rel_err(a, ref):
    return float((a - ref).abs().max() / ref.abs().max())


def expected_outputs(params, cfg, ids, mask):
    """Ground truth per example, each run alone at its exact length in
    float64; then checks that padded batches (right padding, and left padding
    with positions counted from the first real token) give the same values
    at every real position, and measures a float32 padded run against it.
    Returns (hidden: L+1 tensors (Ntok, C), logits (Ntok, V), checks dict)."""
    L = cfg["num_hidden_layers"]
    lengths = mask.sum(-1).tolist()
    hid = [[] for _ in range(L + 1)]
    log = []
    for b, n in enumerate(lengths):
        hs, lg = llama_ref.forward(params, cfg, ids[b:b + 1, :n], mask[b:b + 1, :n])
        for l in range(L + 1):
            hid[l].append(hs[l][0])
        log.append(lg[0])
    hid = [torch.cat(h) for h in hid]
    log = torch.cat(log)
    real = mask.bool()

    hs, lg = llama_ref.forward(params, cfg, ids, mask)
    worst64 = max([rel_err(hs[l][real], hid[l]) for l in range(L + 1)] + [rel_err(lg[real], log)])
    assert worst64 < 1e-12, "padded float64 batch differs from unpadded: %g" % worst64

    # Left padding: the same rows shifted right, positions from the first real token.
    T = ids.shape[1]
    lids = torch.full_like(ids, cfg["pad_token_id"])
    lmask = torch.zeros_like(mask)
    for b, n in enumerate(lengths):
        lids[b, T - n:] = ids[b, :n]
        lmask[b, T - n:] = 1
    pos = (lmask.cumsum(-1) - 1).clamp(min=0)
    hs, lg = llama_ref.forward(params, cfg, lids, lmask, position_ids=pos)
    lreal = lmask.bool()
    worstl = max([rel_err(hs[l][lreal], hid[l]) for l in range(L + 1)] + [rel_err(lg[lreal], log)])
    assert worstl < 1e-12, "left-padded float64 batch differs: %g" % worstl

    hs, lg = llama_ref.forward(params, cfg, ids, mask, dtype=torch.float32)
    errs32 = [rel_err(hs[l][real].double(), hid[l]) for l in range(L + 1)]
    err32_logits = rel_err(lg[real].double(), log)
    assert max(errs32 + [err32_logits]) < TOL_REL / 10, "float32 run too far from float64"
    checks = {
        "padded_right_f64_max_rel": worst64,
        "padded_left_f64_max_rel": worstl,
        "padded_right_f32_hidden_max_rel": errs32,
        "padded_right_f32_logits_max_rel": err32_logits,
    }
    return hid, log, checks


def write_expected(d, name, cfg, st_dtype, ids, mask, hid, log, checks, extra):
    L = cfg["num_hidden_layers"]
    lengths = mask.sum(-1).tolist()
    offsets = [sum(lengths[:b]) for b in range(len(lengths))]
    ntok = sum(lengths)
    files = {"hidden": [], "logits": "logits.npy", "last_token": [], "mean": []}
    for l in range(L + 1):
        fn = "hidden_%d.npy" % l
        write_npy(os.path.join(d, fn), hid[l].numpy())
        files["hidden"].append(fn)
        last = torch.stack([hid[l][offsets[b] + lengths[b] - 1] for b in range(len(lengths))])
        mean = torch.stack([hid[l][offsets[b]:offsets[b] + lengths[b]].mean(0)
                            for b in range(len(lengths))])
        fn = "last_token_%d.npy" % l
        write_npy(os.path.join(d, fn), last.numpy())
        files["last_token"].append(fn)
        fn = "mean_%d.npy" % l
        write_npy(os.path.join(d, fn), mean.numpy())
        files["mean"].append(fn)
    write_npy(os.path.join(d, "logits.npy"), log.numpy())
    exp = {
        "model": name,
        "storage_dtype": st_dtype,
        "num_layers": L,
        "hidden_size": cfg["hidden_size"],
        "vocab_size": cfg["vocab_size"],
        "pad_token_id": cfg["pad_token_id"],
        "batch": {
            "padding_side": "right",
            "T": int(ids.shape[1]),
            "lengths": lengths,
            "input_ids": ids.tolist(),
            "attention_mask": mask.tolist(),
        },
        "n_tokens": ntok,
        "offsets": offsets,
        "files": files,
        "shapes": {"hidden": [ntok, cfg["hidden_size"]], "logits": [ntok, cfg["vocab_size"]],
                   "last_token": [len(lengths), cfg["hidden_size"]],
                   "mean": [len(lengths), cfg["hidden_size"]]},
        "tolerance": {"max_abs_err_over_max_abs_ref": TOL_REL,
                      "applies_to": "each .npy file separately, C float32 output vs the file"},
        "checks": checks,
    }
    exp.update(extra)
    write_json(os.path.join(d, "expected.json"), exp)


def llama2c_tensors(p, cfg):
    """llama2.c names -> float32 tensors stacked over layers, q/k rows
    converted to the interleaved RoPE layout."""
    C, NH, NKV, HS = llama_ref.dims(cfg)
    st = torch.stack
    return {
        "token_embedding": p["embed"],
        "rms_att": st(p["attn_norm"]),
        "wq": st([llama_ref.hf_to_interleaved(w, NH) for w in p["wq"]]),
        "wk": st([llama_ref.hf_to_interleaved(w, NKV) for w in p["wk"]]),
        "wv": st(p["wv"]),
        "wo": st(p["wo"]),
        "rms_ffn": st(p["mlp_norm"]),
        "w1": st(p["w_gate"]),
        "w2": st(p["w_down"]),
        "w3": st(p["w_up"]),
        "rms_final": p["final_norm"],
        "wcls": p["embed"] if cfg["tie_word_embeddings"] else p["lm_head"],
    }


def f32b(t):
    return t.detach().contiguous().to(torch.float32).numpy().astype("<f4").tobytes()


def write_llama2c(d, p, cfg):
    """Writes llama2c.bin (legacy header) and llama2c_v1.bin (version 1)."""
    C, NH, NKV, HS = llama_ref.dims(cfg)
    L, FF, V = cfg["num_hidden_layers"], cfg["intermediate_size"], cfg["vocab_size"]
    S = cfg["max_position_embeddings"]
    tied = cfg["tie_word_embeddings"]
    w = llama2c_tensors(p, cfg)
    ang = torch.outer(torch.arange(S, dtype=torch.float64),
                      1.0 / (10000.0 ** (torch.arange(0, HS, 2, dtype=torch.float64) / HS)))
    with open(os.path.join(d, "llama2c.bin"), "wb") as f:
        f.write(struct.pack("<7i", C, FF, L, NH, NKV, V if tied else -V, S))
        for k in ["token_embedding", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2",
                  "w3", "rms_final"]:
            f.write(f32b(w[k]))
        f.write(f32b(ang.cos()))
        f.write(f32b(ang.sin()))
        if not tied:
            f.write(f32b(w["wcls"]))
    with open(os.path.join(d, "llama2c_v1.bin"), "wb") as f:
        hdr = struct.pack("<Ii7iB", 0x616B3432, 1, C, FF, L, NH, NKV, V, S, 1 if tied else 0)
        f.write(hdr + b"\0" * (256 - len(hdr)))
        for k in ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq", "wk", "wv", "wo",
                  "w1", "w2", "w3"]:
            f.write(f32b(w[k]))
        if not tied:
            f.write(f32b(w["wcls"]))


def read_llama2c(path):
    """Parses a llama2.c file back (independently of the writer's tensor
    list), for the check that it reproduces the HF expected outputs."""
    raw = open(path, "rb").read()
    if struct.unpack_from("<I", raw, 0)[0] == 0x616B3432:
        C, FF, L, NH, NKV, V, S = struct.unpack_from("<7i", raw, 8)
        shared = raw[36] == 1
        off, order, skip_freq = 256, ["rms_att", "rms_ffn", "rms_final", "token_embedding", "wq",
                                      "wk", "wv", "wo", "w1", "w2", "w3"], False
    else:
        C, FF, L, NH, NKV, V, S = struct.unpack_from("<7i", raw, 0)
        shared = V > 0
        V = abs(V)
        off, order, skip_freq = 28, ["token_embedding", "rms_att", "wq", "wk", "wv", "wo",
                                     "rms_ffn", "w1", "w2", "w3", "rms_final"], True
    HS = C // NH
    shapes = {"token_embedding": (V, C), "rms_att": (L, C), "wq": (L, NH * HS, C),
              "wk": (L, NKV * HS, C), "wv": (L, NKV * HS, C), "wo": (L, C, NH * HS),
              "rms_ffn": (L, C), "w1": (L, FF, C), "w2": (L, C, FF), "w3": (L, FF, C),
              "rms_final": (C,), "wcls": (V, C)}
    w = {}
    for k in order:
        n = int(np.prod(shapes[k]))
        w[k] = torch.from_numpy(np.frombuffer(raw, "<f4", n, off).astype(np.float64)).view(shapes[k])
        off += 4 * n
    if skip_freq:
        off += 2 * 4 * S * (HS // 2)
    if shared:
        w["wcls"] = w["token_embedding"]
    else:
        n = V * C
        w["wcls"] = torch.from_numpy(np.frombuffer(raw, "<f4", n, off).astype(np.float64)).view(V, C)
        off += 4 * n
    assert off == len(raw), "%s: %d bytes left over" % (path, len(raw) - off)
    return w, (C, FF, L, NH, NKV)


def check_llama2c(path, cfg, ids, mask, hid, log):
    w, (C, FF, L, NH, NKV) = read_llama2c(path)
    worst = 0.0
    lengths = mask.sum(-1).tolist()
    for b, n in enumerate(lengths):
        o = sum(lengths[:b])
        hs, lg = llama_ref.forward_interleaved(w, C, FF, L, NH, NKV, ids[b, :n].tolist(),
                                               eps=cfg["rms_norm_eps"])
        for l in range(L + 1):
            worst = max(worst, rel_err(hs[l], hid[l][o:o + n]))
        worst = max(worst, rel_err(lg, log[o:o + n]))
    assert worst < 1e-12, "%s does not reproduce the HF outputs: %g" % (path, worst)
    return worst


def gen_model(name, cfg, st_dtype, params, batch_seed, shards=1, llama2c=False, batch=None,
              extra=None, greedy=False):
    """Writes one model directory: config, weights, expected outputs (and
    llama2.c exports when asked). batch: (ids, mask) instead of random
    prompts; extra: more keys for expected.json; greedy: also record greedy
    continuations of every prompt."""
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    write_json(os.path.join(d, "config.json"), cfg)
    named = llama_ref.hf_tensors(params, cfg)
    if shards == 1:
        write_safetensors(os.path.join(d, "model.safetensors"), named, st_dtype)
    else:
        per = (len(named) + shards - 1) // shards
        wmap = {}
        total = 0
        for s in range(shards):
            fn = "model-%05d-of-%05d.safetensors" % (s + 1, shards)
            part = named[s * per:(s + 1) * per]
            total += write_safetensors(os.path.join(d, fn), part, st_dtype)
            for n, _ in part:
                wmap[n] = fn
        write_json(os.path.join(d, "model.safetensors.index.json"),
                   {"metadata": {"total_size": total}, "weight_map": wmap})
    rp = round_params(params, st_dtype)
    back = {}
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            back.update(read_safetensors(os.path.join(d, fn)))
    assert sorted(back) == sorted(n for n, _ in named), "tensor names differ on read-back"
    for n, t in llama_ref.hf_tensors(rp, cfg):
        assert torch.equal(back[n], t), "%s differs on read-back" % n
    if batch is None:
        ids, mask = make_batch(cfg, batch_seed)
    else:
        ids, mask = batch
    hid, log, checks = expected_outputs(rp, cfg, ids, mask)
    extra = dict(extra or {})
    if greedy:
        extra["greedy"] = [greedy_generate(rp, cfg, ids[b, :n].tolist(), GREEDY_NEW_TOKENS)
                           for b, n in enumerate(mask.sum(-1).tolist())]
    if llama2c:
        write_llama2c(d, rp, cfg)
        for fn in ["llama2c.bin", "llama2c_v1.bin"]:
            checks[fn + "_f64_max_rel"] = check_llama2c(os.path.join(d, fn), cfg, ids, mask, hid, log)
        extra["llama2c"] = {"legacy": "llama2c.bin", "v1": "llama2c_v1.bin",
                            "note": "float32 export of this model; same expected outputs"}
    write_expected(d, name, cfg, st_dtype, ids, mask, hid, log, checks, extra)
    print("%s: %s" % (name, json.dumps(checks)))


CORPUS = """The quick brown fox jumps over the lazy dog.
A model reads the text one token at a time, and the tokens are pieces of words.
Layer by layer, the hidden states of the model change as the text moves through it.
The study compares the states of every layer with the states of the other layers.
When the model is trained on instructions, the middle layers often carry the most useful features.
She said that the naive method was not the best one, but the naïve reader liked it.
We train the model, we test the model, and we read the results with care.
The weather was cold in the morning and warm in the afternoon.
There are three things to remember: the data, the model and the evaluation.
Numbers like 12, 345 and 2024 appear in the text as well as words.
Hello world! This is a small text for a small tokenizer, written for the tests.
Where is the station? It is on the other side of the river, near the old bridge.
The instruction asks the assistant to answer the question in one sentence.
Input and output pairs are used to teach the model to follow instructions.
"""

TOKENIZER_TEXTS = [
    "Hello world",
    "the quick brown fox",
    "The model reads the text layer by layer.",
    "a",
    " leading space",
    "trailing space ",
    "multiple   spaces  here",
    "line one\nline two\n",
    "\n",
    "tabs\tand\ttabs",
    "naïve",
    "café",
    "Unicode outside: \u65e5\u672c\u8a9e \u2603 \U0001F642",
    "",
    " ",
    "<s>",
    "</s>",
    "<unk>",
    "Hello</s>world",
    "<s>[INST] hello [/INST]",
    "<s>[INST] <<SYS>>\nYou are a helpful assistant.\n<</SYS>>\n\nWhat is 2+2? [/INST]",
    "</s><s>two specials",
    "text with <s in it and s> too",
    "Numbers: 12345, 2024!",
    "UPPER lower MiXeD",
    "the the the",
    "layerlayerlayer",
    "eee",
    "  ",
    "Hello\n\nworld",
    "<s><s>",
    "<unk>text",
]


def gen_tokenizer():
    d = os.path.join(OUT, "tokenizer")
    os.makedirs(d, exist_ok=True)
    vocab, merges = tokenizer_ref.train(CORPUS, 160)
    tok = tokenizer_ref.Tokenizer(vocab, merges)
    write_json(os.path.join(d, "tokenizer.json"), tok.to_json(merges))
    write_json(os.path.join(d, "tokenizer_config.json"), {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": True,
        "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": False})
    cases = []
    for text in TOKENIZER_TEXTS:
        ids = tok.encode(text)
        toks = [vocab[i] for i in ids]
        dec = tok.decode(ids)
        cases.append({"text": text, "ids": ids, "tokens": toks, "decoded": dec,
                      "decoded_skip_special": tok.decode(ids, skip_special=True),
                      "roundtrip": dec == text,
                      "byte_fallback": any(tokenizer_ref.BYTE_RE.match(t) for t in toks)})
    assert any(len(vocab[i]) > 2 for c in cases for i in c["ids"]), "no multi-char merges used"
    assert any(c["byte_fallback"] for c in cases)
    write_json(os.path.join(d, "tokenizer_cases.json"), {
        "vocab_size": len(vocab), "bos_id": 1, "eos_id": 2, "unk_id": 0,
        "note": "ids are add_special_tokens=False; with BOS, prepend 1",
        "cases": cases})
    print("tokenizer: vocab %d, merges %d, cases %d" % (len(vocab), len(merges), len(cases)))
    return tok, merges


CHAT_TEXTS = [
    "Hello world",
    "The model reads the text layer by layer.",
    "<s>[INST] hello [/INST]",
    "naïve café",
    "line one\nline two\n",
    "a",
]


GREEDY_NEW_TOKENS = 8


def greedy_generate(params, cfg, prompt, max_new):
    """Greedy decoding as HF generate(do_sample=False) does it: append the
    argmax of the last position's logits, stop after eos_token_id or max_new
    tokens. Recomputes the whole sequence each step (float64). Returns
    {"new_ids", "stopped_at_eos", "min_top2_gap"}; the gap (top logit minus
    the runner-up, smallest over the steps) says how safe the argmax is."""
    seq = list(prompt)
    new = []
    gap = float("inf")
    eos = False
    for _ in range(max_new):
        ids = torch.tensor([seq])
        _, lg = llama_ref.forward(params, cfg, ids, torch.ones_like(ids))
        last = lg[0, -1]
        top = torch.topk(last, 2)
        gap = min(gap, float(top.values[0] - top.values[1]))
        nxt = int(top.indices[0])
        new.append(nxt)
        seq.append(nxt)
        if nxt == cfg["eos_token_id"]:
            eos = True
            break
    assert gap > 1e-3, "greedy step too close to a tie for a float32 engine: %g" % gap
    return {"new_ids": new, "stopped_at_eos": eos, "min_top2_gap": gap}


def gen_chat(tok, merges):
    """A tiny model whose vocab is the tokenizer's, with the tokenizer files
    beside it, and expected outputs for BOS + encode(text) of CHAT_TEXTS (no
    extra BOS where the text starts with <s>): text in, hidden states out."""
    V = len(tok.vocab)
    cfg = make_config(16, 2, 2, 1, 44, V, True, 10000.0, 1e-5, "BF16")
    seqs = []
    for text in CHAT_TEXTS:
        ids = tok.encode(text)
        seqs.append(ids if text.startswith("<s>") else [1] + ids)
    params = make_params(cfg, 2468)
    greedy = [greedy_generate(round_params(params, "BF16"), cfg, q, GREEDY_NEW_TOKENS)
              for q in seqs]
    for gr, q in zip(greedy, seqs):
        gr["predict"] = tok.decode(gr["new_ids"], skip_special=True)
    gen_model("chat", cfg, "BF16", params, 0, batch=pad_batch(cfg, seqs), llama2c=True,
              extra={"texts": CHAT_TEXTS, "text_ids": "BOS (1) + encode(text); no extra BOS "
                     "when the text starts with <s>", "greedy": greedy})
    d = os.path.join(OUT, "chat")
    write_json(os.path.join(d, "tokenizer.json"), tok.to_json(merges))
    src = os.path.join(OUT, "tokenizer", "tokenizer_config.json")
    with open(src, "rb") as f, open(os.path.join(d, "tokenizer_config.json"), "wb") as g:
        g.write(f.read())


def main():
    gqa = make_config(64, 3, 4, 2, 172, 300, False, 10000.0, 1e-5, "F32")
    pg = make_params(gqa, 1234)
    gen_model("gqa", gqa, "F32", pg, 4321, llama2c=True, greedy=True)
    tied = make_config(48, 2, 6, 6, 128, 260, True, 500000.0, 1e-6, "BF16")
    gen_model("tied", tied, "BF16", make_params(tied, 5678), 8765)
    sh = dict(gqa, torch_dtype="float16")
    gen_model("sharded", sh, "F16", pg, 4321, shards=2)
    tok, merges = gen_tokenizer()
    gen_chat(tok, merges)


if __name__ == "__main__":
    main()
