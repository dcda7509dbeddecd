"""bench/gpu/memplan.py - GPU memory of strata's CUDA engine for a LLaMA config,
from the sizes the code states: forward.h's llama_state (activations; the
training buffers' formula in its comment), the CUDA backend's copies
(backend.cu: the model in fp32 via llama_model_to_backend, a bf16/fp16 copy
of every registered weight, a low-precision scratch as large as the biggest
product's operands, 32 MiB of cuBLAS workspace), and the LoRA buffers.
The forward's (B, T, V) device logits are allocated only when logits are
asked for (predict asks for none; training's logits are in its working
space), so they are not counted.

    python3 bench/gpu/memplan.py                 the tables docs/gpu.md shows
    python3 bench/gpu/memplan.py --check FILE    exit 1 unless FILE holds them
                                                 verbatim between the
                                                 memplan:begin/end markers
Standard library only. GiB = 2^30 bytes."""
import sys

LLAMA2_7B = dict(C=4096, FF=11008, L=32, NH=32, NKV=32, V=32000, tied=False)
GIB = 2.0 ** 30
CONTEXT = 0.5 * GIB  # CUDA context and cuBLAS handles, roughly, per process


def nparams(c):
    C, FF, L, V = c["C"], c["FF"], c["L"], c["V"]
    kvd = C // c["NH"] * c["NKV"]
    per_layer = 2 * C * C + 2 * C * kvd + 3 * C * FF + 2 * C
    return V * C * (1 if c["tied"] else 2) + L * per_layer + C


def plan(c, B, T, train, r=8, targets=("q", "v")):
    """[(item, bytes)] for the current engine."""
    C, FF, L, V = c["C"], c["FF"], c["L"], c["V"]
    kvd = C // c["NH"] * c["NKV"]
    HS = C // c["NH"]
    N = B * T
    P = nparams(c)
    items = [
        ("model, fp32 (llama_model_to_backend)", 4 * P),
        ("bf16 copy of the registered weights", 2 * P),
        ("activations (llama_state_init: x, xn, q, k, v, gate, up, scores, rope)",
         4 * (N * (3 * C + 2 * kvd + 2 * FF) + T * T + T * HS)),
    ]
    if train:
        dims = dict(q=(C, C), k=(kvd, C), v=(kvd, C), o=(C, C))
        n_lora = L * sum(r * (dims[t][0] + dims[t][1]) for t in targets)
        items += [
            ("saved for the backward: N (L (4C + 2KVD + 2FF) + C)",
             4 * N * (L * (4 * C + 2 * kvd + 2 * FF) + C)),
            ("backward working space: N (V + 3C + 2KVD + 3FF) + 2 T^2",
             4 * (N * (V + 3 * C + 2 * kvd + 3 * FF) + 2 * T * T)),
            ("LoRA u (L, 7, N, r) and du (N, r)", 4 * (L * 7 * N * r + N * r)),
            ("LoRA params and gradients (fp32)", 2 * 4 * n_lora),
        ]
        scratch = 2 * N * (V + C)  # lm_head's backward: dy (N, V) and x (N, C) in bf16
    else:
        scratch = 2 * N * max(C, FF)  # the widest activation operand of a product
    items += [("low-precision operand scratch", scratch), ("cuBLAS workspace", 32 << 20),
              ("CUDA context (approximate)", CONTEXT)]
    return items


def table(title, items, budget_gb):
    total = sum(b for _, b in items)
    lines = ["**%s**" % title, "", "| item | GiB |", "|---|---:|"]
    lines += ["| %s | %.2f |" % (k, b / GIB) for k, b in items]
    lines.append("| **total** | **%.2f** |" % (total / GIB))
    budget = budget_gb * 1e9 / GIB
    fp32 = items[0][1]
    lines.append("")
    lines.append("Against %d GB (%.1f GiB): %s by %.1f GiB as the engine stands; "
                 "without the fp32 copy of the frozen weights (%.2f GiB): total %.2f GiB, %s."
                 % (budget_gb, budget, "fits" if total <= budget * GIB else "over",
                    abs(budget * GIB - total) / GIB, fp32 / GIB, (total - fp32) / GIB,
                    "fits" if total - fp32 <= budget * GIB else "still over"))
    return lines


def render():
    c = LLAMA2_7B
    out = ["Llama-2-7B: %d parameters (untied head), C %d, FF %d, L %d, V %d."
           % (nparams(c), c["C"], c["FF"], c["L"], c["V"]), ""]
    out += table("LoRA r 8 on q_proj, v_proj, batch 4 x 1024, bf16 products", plan(c, 4, 1024, True), 80)
    out.append("")
    out += table("predict, batch 8 x 1024, bf16 products", plan(c, 8, 1024, False), 24)
    return "\n".join(out) + "\n"


def main():
    text = render()
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        doc = open(sys.argv[2]).read()
        try:
            block = doc.split("<!-- memplan:begin -->\n", 1)[1].split("<!-- memplan:end -->", 1)[0]
        except IndexError:
            print("memplan: %s has no memplan:begin/end block" % sys.argv[2])
            sys.exit(1)
        if block != text:
            print("memplan: the numbers in %s differ from bench/gpu/memplan.py's; expected:\n%s"
                  % (sys.argv[2], text))
            sys.exit(1)
        print("memplan: %s matches" % sys.argv[2])
        return
    if len(sys.argv) != 1:
        print(__doc__)
        sys.exit(2)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
