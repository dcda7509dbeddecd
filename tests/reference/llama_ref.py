"""llama_ref.py - a plain PyTorch LLaMA forward pass, written from the Hugging
Face LlamaForCausalLM definitions (no transformers import), used to produce the
ground truth that strata's C engine is tested against.

Semantics (ARCHITECTURE.md "Engine semantics"):
  - RMSNorm: x * rsqrt(mean(x^2) + eps) * weight, computed in the working
    precision (fp32 or fp64), eps from the config.
  - RoPE in the rotate-half convention: inv_freq[i] = 1 / theta^(2i/HS),
    i in [0, HS/2); angle(p, i) = p * inv_freq[i]; cos/sin are the angles
    concatenated twice (length HS); q' = q*cos + rotate_half(q)*sin with
    rotate_half(x) = cat(-x[HS/2:], x[:HS/2]).
  - Grouped-query attention: query head h uses key/value head h // (NH/NKV)
    (HF's repeat_kv), scores scaled by 1/sqrt(HS), causal mask plus a key
    padding mask, softmax over keys.
  - MLP: down(silu(gate(x)) * up(x)).
  - Hidden states as output_hidden_states=True: index 0 = token embeddings,
    index i (1 <= i < L) = output of decoder layer i, index L = output of the
    last layer AFTER the final RMSNorm. logits = lm_head(index L).
"""
import math

import torch

# Names of the per-layer tensors, in Hugging Face's naming, with the key of
# our params dict that holds them stacked over layers.
LAYER_TENSORS = [
    ("input_layernorm.weight", "attn_norm"),
    ("self_attn.q_proj.weight", "wq"),
    ("self_attn.k_proj.weight", "wk"),
    ("self_attn.v_proj.weight", "wv"),
    ("self_attn.o_proj.weight", "wo"),
    ("post_attention_layernorm.weight", "mlp_norm"),
    ("mlp.gate_proj.weight", "w_gate"),
    ("mlp.up_proj.weight", "w_up"),
    ("mlp.down_proj.weight", "w_down"),
]


def dims(cfg):
    C = cfg["hidden_size"]
    NH = cfg["num_attention_heads"]
    NKV = cfg.get("num_key_value_heads", NH)
    return C, NH, NKV, C // NH


def hf_tensors(params, cfg):
    """Returns an ordered list of (HF name, tensor) for a params dict whose
    per-layer entries are lists indexed by layer. lm_head is left out when the
    embeddings are tied."""
    out = [("model.embed_tokens.weight", params["embed"])]
    for i in range(cfg["num_hidden_layers"]):
        for hf_name, key in LAYER_TENSORS:
            out.append(("model.layers.%d.%s" % (i, hf_name), params[key][i]))
    out.append(("model.norm.weight", params["final_norm"]))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", params["lm_head"]))
    return out


def rms_norm(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(var + eps) * w


def rope_cos_sin(positions, head_size, theta, dtype):
    """cos and sin of shape positions.shape + (head_size,), HF layout."""
    idx = torch.arange(0, head_size, 2, dtype=torch.float64) / head_size
    inv_freq = 1.0 / (float(theta) ** idx)
    ang = positions.to(torch.float64).unsqueeze(-1) * inv_freq
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def forward(params, cfg, input_ids, attention_mask, position_ids=None, dtype=torch.float64):
    """Runs the model on a (B, T) batch. attention_mask is (B, T), 1 for real
    tokens. position_ids defaults to 0..T-1 for every row (right padding).
    Returns (hidden_states, logits): a list of L+1 (B, T, C) tensors and a
    (B, T, V) tensor, all in dtype. Values at padded positions are
    meaningless."""
    C, NH, NKV, HS = dims(cfg)
    L = cfg["num_hidden_layers"]
    eps = cfg["rms_norm_eps"]
    B, T = input_ids.shape
    p = {k: (v.to(dtype) if torch.is_tensor(v) else [t.to(dtype) for t in v])
         for k, v in params.items()}
    if position_ids is None:
        position_ids = torch.arange(T).unsqueeze(0).expand(B, T)
    cos, sin = rope_cos_sin(position_ids, HS, cfg["rope_theta"], dtype)  # (B, T, HS)
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)

    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    keep = causal.unsqueeze(0) & attention_mask.bool().unsqueeze(1)  # (B, Tq, Tk)
    neg = torch.finfo(dtype).min
    bias = torch.zeros(B, 1, T, T, dtype=dtype).masked_fill(~keep.unsqueeze(1), neg)

    h = p["embed"][input_ids]
    hidden = [h]
    rep = NH // NKV
    for i in range(L):
        x = rms_norm(h, p["attn_norm"][i], eps)
        q = (x @ p["wq"][i].T).view(B, T, NH, HS).transpose(1, 2)
        k = (x @ p["wk"][i].T).view(B, T, NKV, HS).transpose(1, 2)
        v = (x @ p["wv"][i].T).view(B, T, NKV, HS).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(HS) + bias
        a = torch.softmax(s, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, T, NH * HS)
        h = h + o @ p["wo"][i].T
        x = rms_norm(h, p["mlp_norm"][i], eps)
        g = x @ p["w_gate"][i].T
        u = x @ p["w_up"][i].T
        h = h + (torch.nn.functional.silu(g) * u) @ p["w_down"][i].T
        if i < L - 1:
            hidden.append(h)
    hn = rms_norm(h, p["final_norm"], eps)
    hidden.append(hn)
    head = p["embed"] if cfg["tie_word_embeddings"] else p["lm_head"]
    logits = hn @ head.T
    return hidden, logits


def forward_interleaved(weights, dim, hidden_dim, n_layers, n_heads, n_kv_heads, tokens,
                        eps=1e-5, theta=10000.0):
    """An independent forward pass the way llama2.c's model.py computes it:
    q/k rows in the INTERLEAVED RoPE layout (pairs 2i, 2i+1 of a head rotate
    together by angle p * theta^(-2i/HS)). weights holds llama2.c names
    (token_embedding, rms_att, wq, wk, wv, wo, rms_ffn, w1, w2, w3, rms_final,
    wcls) as float64 tensors. Runs one unpadded sequence; returns
    (hidden_states list of L+1 (T, C), logits (T, V)) with HF's indexing."""
    HS = dim // n_heads
    T = len(tokens)
    ang = torch.outer(torch.arange(T, dtype=torch.float64),
                      1.0 / (theta ** (torch.arange(0, HS, 2, dtype=torch.float64) / HS)))
    rot = torch.polar(torch.ones_like(ang), ang)  # (T, HS/2) complex

    def rope(x, nh):
        xc = torch.view_as_complex(x.view(T, nh, HS // 2, 2).contiguous())
        return torch.view_as_real(xc * rot.unsqueeze(1)).reshape(T, nh * HS)

    h = weights["token_embedding"][torch.tensor(tokens)]
    hidden = [h]
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    rep = n_heads // n_kv_heads
    for i in range(n_layers):
        x = rms_norm(h, weights["rms_att"][i], eps)
        q = rope(x @ weights["wq"][i].T, n_heads).view(T, n_heads, HS).transpose(0, 1)
        k = rope(x @ weights["wk"][i].T, n_kv_heads).view(T, n_kv_heads, HS).transpose(0, 1)
        v = (x @ weights["wv"][i].T).view(T, n_kv_heads, HS).transpose(0, 1)
        k = k.repeat_interleave(rep, dim=0)
        v = v.repeat_interleave(rep, dim=0)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HS) + mask, dim=-1)
        h = h + (a @ v).transpose(0, 1).reshape(T, dim) @ weights["wo"][i].T
        x = rms_norm(h, weights["rms_ffn"][i], eps)
        h = h + (torch.nn.functional.silu(x @ weights["w1"][i].T) * (x @ weights["w3"][i].T)) \
            @ weights["w2"][i].T
        if i < n_layers - 1:
            hidden.append(h)
    hn = rms_norm(h, weights["rms_final"], eps)
    hidden.append(hn)
    return hidden, hn @ weights["wcls"].T


def hf_to_interleaved(w, n_heads):
    """Inverse of convert_llama_weights_to_hf's permute: HF rotate-half rows
    of q/k -> Meta/llama2.c interleaved rows. Within each head, HF row
    j*HS/2 + i (j in {0,1}) becomes row 2i + j."""
    out_dim, in_dim = w.shape
    hs = out_dim // n_heads
    return w.reshape(n_heads, 2, hs // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
