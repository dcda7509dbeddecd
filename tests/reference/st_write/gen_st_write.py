"""gen_st_write.py - fixtures for strata's safetensors writer (st_write_file).

Writes, into fixtures/ beside this script:
  input.safetensors     the source values, all float32, in list order (not the
                        reference order), read by tests/unit/test_st_write.c;
  expected.safetensors  the same tensors stored as TARGET below, laid out as
                        Hugging Face's safetensors library (safetensors/src/tensor.rs,
                        `prepare`) lays out a file: tensors sorted by dtype from
                        widest to narrowest (F32 > BF16 > F16), then by name;
                        data back to back in that order; compact JSON header
                        (serde_json: no spaces, UTF-8 kept) with "__metadata__"
                        first, padded with spaces to a multiple of 8 bytes.
F16/BF16 values come from torch's own .to(float16/bfloat16) (round to nearest
even). The test writes the same tensors with st_write_file and compares bytes.
Deterministic (fixed seed). Run: /usr/bin/python3 tests/reference/st_write/gen_st_write.py
"""
import json
import math
import os
import struct

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# name -> target dtype; the C test has the same table.
TARGET = [
    ("model.layers.1.mlp.up_proj.weight", "F32"),
    ("model.layers.0.self_attn.q_proj.weight", "BF16"),
    ("lm_head.weight", "F16"),
    ("b.scalar", "F32"),
    ("a.empty", "BF16"),
    ("model.norm.weight", "F16"),
    ("\u00e9t\u00e9.weight", "F32"),
    ('quote"name', "BF16"),
    ("model.layers.0.self_attn.k_proj.weight", "BF16"),
]
RANK = {"F16": 7, "BF16": 8, "F32": 11}  # the library's Dtype order
SIZE = {"F16": 2, "BF16": 2, "F32": 4}


def f32_from_bits(bits):
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def make_inputs():
    g = torch.Generator().manual_seed(20261128)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float32) * scale

    t = {}
    t["model.layers.1.mlp.up_proj.weight"] = randn(5, 7)
    q = randn(6, 4)
    # exact bf16 ties (low 16 bits 0x8000), both parities of the kept bit
    q[0, 0] = f32_from_bits(0x3F808000)
    q[0, 1] = f32_from_bits(0x3F818000)
    q[0, 2] = f32_from_bits(0xBF808000)
    q[0, 3] = float("inf")
    q[1, 0] = f32_from_bits(0x7F7FFFFF)  # rounds up to inf
    q[1, 1] = -0.0
    q[1, 2] = f32_from_bits(0x00000001)  # float32 subnormal
    t["model.layers.0.self_attn.q_proj.weight"] = q
    h = randn(3, 5, scale=4.0)
    h[0, 0] = 65519.0      # below the halfway point: 65504
    h[0, 1] = 65520.0      # halfway: inf
    h[0, 2] = -1e6         # -inf
    h[0, 3] = 3e-6         # half subnormal
    h[0, 4] = 2.0 ** -25   # tie between 0 and the smallest subnormal: 0
    h[1, 0] = 3 * 2.0 ** -25  # tie: rounds to 2 * 2^-24 (even)
    h[1, 1] = f32_from_bits(0x3F801000)  # tie, kept bit even: down
    h[1, 2] = f32_from_bits(0x3F803000)  # tie, kept bit odd: up
    h[1, 3] = 6.1e-5       # just below the smallest normal half
    h[1, 4] = float("nan")
    t["lm_head.weight"] = h
    t["b.scalar"] = torch.tensor(math.pi, dtype=torch.float32)
    t["a.empty"] = torch.zeros(0, 3, dtype=torch.float32)
    t["model.norm.weight"] = 1 + randn(9, scale=0.1)
    t["\u00e9t\u00e9.weight"] = randn(2)
    t['quote"name'] = randn(1)
    t["model.layers.0.self_attn.k_proj.weight"] = randn(2, 4, 3)
    return t


def tensor_bytes(x, dt):
    x = x.contiguous()
    if dt == "F32":
        return x.numpy().astype("<f4").tobytes()
    if dt == "F16":
        return x.to(torch.float16).numpy().astype("<f2").tobytes()
    return x.to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()


def write_file(path, named, metadata):
    """named: list of (name, dtype, tensor) in the order to store them."""
    header = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    blobs, off = [], 0
    for name, dt, x in named:
        b = tensor_bytes(x, dt)
        assert len(b) == SIZE[dt] * x.numel()
        header[name] = {"dtype": dt, "shape": list(x.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    hj = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def main():
    t = make_inputs()
    write_file(os.path.join(HERE, "input.safetensors"),
               [(n, "F32", t[n]) for n, _ in TARGET], None)
    ordered = sorted(TARGET, key=lambda nd: (-RANK[nd[1]], nd[0].encode("utf-8")))
    write_file(os.path.join(HERE, "expected.safetensors"),
               [(n, dt, t[n]) for n, dt in ordered], {"format": "pt"})
    # spot checks of torch's rounding the C side must reproduce
    lm = torch.frombuffer(bytearray(tensor_bytes(t["lm_head.weight"], "F16")), dtype=torch.int16)
    assert lm[1].item() & 0xFFFF == 0x7C00 and lm[2].item() & 0xFFFF == 0xFC00
    assert lm[0].item() == 0x7BFF and lm[4].item() == 0 and lm[5].item() == 2
    print("wrote input.safetensors and expected.safetensors; order:", [n for n, _ in ordered])


if __name__ == "__main__":
    main()
