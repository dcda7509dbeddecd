"""bench/gpu/memplan.py - GPU memory of strata's CUDA engine for a LLaMA config,
from the sizes the code states: forward.h's llama_state (activations; the
training buffers' formula in its comment), the frozen model as
llama_model_to_backend_frozen places it for predict and for LoRA's base
model in bf16/fp16 (model_backend.h: embedding and norms in fp32, the seven
projections and an untied head only in bf16 via cuda_backend_upload_frozen,
a tied head's bf16 copy registered), the CUDA backend's low-precision
scratch as large as the biggest product's converted operands, 32 MiB of
cuBLAS workspace, the tensor-core attention's workspace (attn_ws below),
and the LoRA buffers (parameters, gradients and AdamW's
two moments, all fp32 on the device). For comparison each table also states
the total of the placement before frozen weights (the whole model in fp32
plus a registered bf16 copy of all of it).
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


def fp32_part(c):
    """Floats a frozen placement keeps in fp32: embedding and norms."""
    C, L, V = c["C"], c["L"], c["V"]
    return V * C + 2 * L * C + C


def model_items(c):
    """The frozen model's device bytes (llama_model_to_backend_frozen, bf16)."""
    P, F = nparams(c), fp32_part(c)
    items = [("embedding and norms, fp32", 4 * F),
             ("projections%s, bf16 only (frozen)" % ("" if c["tied"] else " and lm_head"),
              2 * (P - F))]
    if c["tied"]:
        items.append(("bf16 copy of the tied head", 2 * c["V"] * c["C"]))
    return items


# worker/engine/cuda/attn_gemm.h's constants of the same names.
ATTN_GEMM_MIN_T = 64
ATTN_GEMM_SP_CAP = 512 << 20
ATTN_GEMM_ALIGN = 256
ATTN_GEMM_GRID_X_MAX = 2147483647


def attn_ws(c, B, T, backward):
    """Bytes of the tensor-core attention's workspace, as attn_gemm_plan_make
    (worker/engine/cuda/attn_gemm_plan.c) lays it out: 16-bit copies of q, k,
    v (and dout in the backward), then fp32 S and 16-bit P of (T, ld), ld = T
    rounded up to 8, for as many kv heads as fit ATTN_GEMM_SP_CAP; every
    region 256-byte aligned. The backend (backend.cu cb_attn_gemm) reserves
    it in bf16/fp16 for T >= ATTN_GEMM_MIN_T and grows it, never shrinks it,
    freeing the old buffer first: its peak is the largest plan, the
    backward's in training. 0 where the flash kernels run instead."""
    if T < ATTN_GEMM_MIN_T:
        return 0
    HS = c["C"] // c["NH"]
    ld = (T + 7) // 8 * 8
    per_head = T * ld * (4 + 2)
    if per_head > ATTN_GEMM_SP_CAP:
        return 0
    chunk = min(ATTN_GEMM_SP_CAP // per_head, c["NKV"])
    chunk = min(chunk, ATTN_GEMM_GRID_X_MAX // T)  # rows of a softmax launch
    nq = B * T * c["NH"] * HS
    nkv = B * T * c["NKV"] * HS

    def align(off):
        return (off + ATTN_GEMM_ALIGN - 1) // ATTN_GEMM_ALIGN * ATTN_GEMM_ALIGN

    off = align(2 * nq)               # q
    off = align(off + 2 * nkv)        # k
    off = align(off + 2 * nkv)        # v
    if backward:
        off = align(off + 2 * nq)     # dout
    off = align(off + 4 * chunk * T * ld)  # S (fp32)
    return align(off + 2 * chunk * T * ld)  # P (16-bit)


def plan(c, B, T, train, r=8, targets=("q", "v")):
    """[(item, bytes)] for the current engine."""
    C, FF, L, V = c["C"], c["FF"], c["L"], c["V"]
    kvd = C // c["NH"] * c["NKV"]
    HS = C // c["NH"]
    N = B * T
    items = model_items(c) + [
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
            ("LoRA params, gradients and AdamW moments (fp32)", 4 * 4 * n_lora),
        ]
        # lm_head's backward: dy (N, V) in bf16; the frozen head is read from
        # its copy and has no gradient, so x is not converted.
        scratch = 2 * N * V
    else:
        scratch = 2 * N * max(C, FF)  # the widest activation operand of a product
    ws_what = ("16-bit q, k, v, dout; S, P" if train else "16-bit q, k, v; S, P")
    items += [("low-precision operand scratch", scratch), ("cuBLAS workspace", 32 << 20),
              ("tensor-core attention workspace (attn_gemm_plan: %s)" % ws_what,
               attn_ws(c, B, T, train)),
              ("CUDA context (approximate)", CONTEXT)]
    return items


def table(title, items, budget_gb, c):
    total = sum(b for _, b in items)
    model = sum(b for _, b in model_items(c))
    before = total - model + 6 * nparams(c)
    lines = ["**%s**" % title, "", "| item | GiB |", "|---|---:|"]
    lines += ["| %s | %.2f |" % (k, b / GIB) for k, b in items]
    lines.append("| **total** | **%.2f** |" % (total / GIB))
    budget = budget_gb * 1e9 / GIB
    lines.append("")
    lines.append("Against %d GB (%.1f GiB): %s by %.1f GiB as the engine stands. Placed as "
                 "before frozen weights (fp32 model plus a registered bf16 copy, %.2f GiB "
                 "instead of %.2f): total %.2f GiB, %s."
                 % (budget_gb, budget, "fits" if total <= budget * GIB else "over",
                    abs(budget * GIB - total) / GIB, 6 * nparams(c) / GIB, model / GIB,
                    before / GIB, "fits" if before <= budget * GIB else "over"))
    return lines


def render():
    c = LLAMA2_7B
    out = ["Llama-2-7B: %d parameters (untied head), C %d, FF %d, L %d, V %d."
           % (nparams(c), c["C"], c["FF"], c["L"], c["V"]), ""]
    out += table("LoRA r 8 on q_proj, v_proj, batch 4 x 1024, bf16 products",
                 plan(c, 4, 1024, True), 80, c)
    out.append("")
    out += table("predict, batch 8 x 1024, bf16 products", plan(c, 8, 1024, False), 24, c)
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
