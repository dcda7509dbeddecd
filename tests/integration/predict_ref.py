"""predict_ref.py - helpers for t_85_predict: reference hidden states of a
predict job computed with tests/reference's plain PyTorch LLaMA and Python
tokenizer, and a perturbed copy of a model's weights.

  predict_ref.py check MODEL_DIR DATASET OUT_DIR [--tol 1e-4]
      Reads the alpaca DATASET (template "vanilla", pool "last_token"), the
      job's OUT_DIR/examples.jsonl and OUT_DIR/hidden_states_{l}.npy (float32).
      Checks that every example's input_ids are BOS + encode(query) by
      tokenizer_ref and its pooled_position the last of them, then that each layer's rows equal the reference (each
      example run alone, float64) at the pooled position:
      max |c - ref| / max |ref| <= tol per layer. Prints one JSON line with
      the measured errors; exits 1 on any mismatch.

  predict_ref.py perturb SRC DST [--seed 7] [--scale 1.0]
      Writes DST, a copy of the safetensors file SRC whose layer weights
      (not the embeddings) are multiplied by 1 + scale * N(0, 1), stored in
      each tensor's own dtype with the same header.
"""
import argparse
import json
import os
import struct
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "reference"))
import llama_ref  # noqa: E402
import tokenizer_ref  # noqa: E402


def read_safetensors(path):
    """Returns (header dict, data bytes) of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    return blob[:8 + n], header, blob[8 + n:]


def tensor_f32(meta, data):
    begin, end = meta["data_offsets"]
    raw = data[begin:end]
    if meta["dtype"] == "F32":
        a = np.frombuffer(raw, dtype="<f4")
    elif meta["dtype"] == "F16":
        a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
    elif meta["dtype"] == "BF16":
        a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError("unsupported dtype " + meta["dtype"])
    return a.reshape(meta["shape"])


def f32_to_dtype_bytes(a, dtype):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    # bf16, round to nearest even
    u = a.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2").tobytes()


def load_params(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    _, header, data = read_safetensors(os.path.join(model_dir, "model.safetensors"))

    def t(name):
        return torch.from_numpy(tensor_f32(header[name], data).astype(np.float64))

    params = {"embed": t("model.embed_tokens.weight"), "final_norm": t("model.norm.weight")}
    for hf_name, key in llama_ref.LAYER_TENSORS:
        params[key] = [t("model.layers.%d.%s" % (i, hf_name))
                       for i in range(cfg["num_hidden_layers"])]
    if not cfg["tie_word_embeddings"]:
        params["lm_head"] = t("lm_head.weight")
    return cfg, params


def load_tokenizer(model_dir):
    with open(os.path.join(model_dir, "tokenizer.json")) as f:
        tj = json.load(f)
    vocab = tj["model"]["vocab"]
    tokens = [None] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in tj["model"]["merges"]]
    return tokenizer_ref.Tokenizer(tokens, merges)


def cmd_check(args):
    cfg, params = load_params(args.model_dir)
    tok = load_tokenizer(args.model_dir)
    with open(args.dataset) as f:
        records = json.load(f)
    with open(os.path.join(args.out_dir, "examples.jsonl")) as f:
        examples = [json.loads(line) for line in f if line.strip()]
    failures = []
    if len(examples) != len(records):
        failures.append("examples.jsonl has %d lines for %d records" % (len(examples),
                                                                        len(records)))
    L = cfg["num_hidden_layers"]
    refs = [[] for _ in range(L + 1)]
    for i, (rec, ex) in enumerate(zip(records, examples)):
        query = rec["instruction"] + ("\n" + rec["input"] if rec.get("input") else "")
        want_ids = [cfg["bos_token_id"]] + tok.encode(query)
        if ex.get("index") != i:
            failures.append("example %d: index %r" % (i, ex.get("index")))
        if ex.get("pooled_position") != len(want_ids) - 1:
            failures.append("example %d: pooled_position %r, expected %d (the last prompt "
                            "token)" % (i, ex.get("pooled_position"), len(want_ids) - 1))
        if ex.get("input_ids") != want_ids:
            failures.append("example %d: input_ids %r, expected %r" % (i, ex.get("input_ids"),
                                                                       want_ids))
        ids = torch.tensor([want_ids])
        hidden, _ = llama_ref.forward(params, cfg, ids, torch.ones_like(ids))
        for layer in range(L + 1):
            refs[layer].append(hidden[layer][0, -1].numpy())
    errors = {}
    for layer in range(L + 1):
        path = os.path.join(args.out_dir, "hidden_states_%d.npy" % layer)
        c = np.load(path)
        ref = np.stack(refs[layer])
        if c.shape != ref.shape or c.dtype != np.float32:
            failures.append("%s: %s %s, expected %s float32" % (path, c.shape, c.dtype,
                                                                ref.shape))
            continue
        err = float(np.max(np.abs(c.astype(np.float64) - ref)) / np.max(np.abs(ref)))
        errors[str(layer)] = err
        if not err <= args.tol:
            failures.append("layer %d: relative error %.3g > %g" % (layer, err, args.tol))
    print(json.dumps({"max_rel_err": errors, "failures": failures}))
    return 1 if failures else 0


def cmd_perturb(args):
    head, header, data = read_safetensors(args.src)
    rng = np.random.default_rng(args.seed)
    out = bytearray(data)
    for name in sorted(header):
        if name == "__metadata__" or not name.startswith("model.layers."):
            continue
        meta = header[name]
        a = tensor_f32(meta, data)
        a = a * (1.0 + args.scale * rng.standard_normal(a.shape)).astype(np.float32)
        b = f32_to_dtype_bytes(a, meta["dtype"])
        begin, end = meta["data_offsets"]
        assert len(b) == end - begin
        out[begin:end] = b
    with open(args.dst, "wb") as f:
        f.write(head)
        f.write(bytes(out))
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check")
    c.add_argument("model_dir")
    c.add_argument("dataset")
    c.add_argument("out_dir")
    c.add_argument("--tol", type=float, default=1e-4)
    q = sub.add_parser("perturb")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--seed", type=int, default=7)
    q.add_argument("--scale", type=float, default=1.0)
    args = p.parse_args()
    return cmd_check(args) if args.cmd == "check" else cmd_perturb(args)


if __name__ == "__main__":
    sys.exit(main())
