"""Rotations folded into the weights (QuaRot's exact part): outliers spread over every channel before rounding.

A decoder's residual stream can be multiplied by any orthogonal matrix Q if every layer that reads it reads
through Q and every layer that writes it writes through Q^T: RMS normalisation commutes with Q once its
weight is folded into the layers it feeds (the norm of a rotated vector is the norm of the vector). So:

- each RMSNorm's weight moves into the columns of the Linear layers after it (the norm keeps ones);
- the embedding's rows become E Q, each reading layer W Q (q, k, v, gate, up, the output layer), each
  writing layer Q^T W (o, down, their biases);
- each attention head's values are rotated by H (v's rows H^T W, o's columns W H): attention mixes a head's
  values with scalar weights, so the rotation passes through it.

Q is a Hadamard matrix with random signs (Sylvester's for powers of two, Paley's for q + 1 with q a prime
3 mod 4 and for 2 (q + 1) with q a prime 1 mod 4, and Kronecker products of those; SmolLM2's 576 = 4 x 12 x 12), or, where no such order is found, a
random orthogonal matrix (said so in the record). The model keeps its architecture: it saves, loads and
exports as any other. An output layer tied to the embedding is untied when the final norm's weight is not
all ones (the table then serves two different matrices): the cost is said. Architectures whose norms or
layers cannot be folded exactly are refused, naming the layer; the fold is checked numerically.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn as nn

from ..core.errors import ShrinkError

# the parameters of a block that read the residual stream, by the norm whose output they read (a Linear's
# weight, a router's, a mixture's fused or one-per-expert experts), and those that write it (regexes)
READS = {"input_layernorm": (r"self_attn\.(q|k|v|qkv)_proj\.weight",),
         "post_attention_layernorm": (r"mlp\.(gate|up|gate_up)_proj\.weight", r"mlp\.gate\.weight",
                                      r"mlp\.experts\.gate_up_proj", r"mlp\.experts\.gate_up\.\d+\.weight",
                                      r"mlp\.shared_expert\.(gate|up)_proj\.weight", r"mlp\.shared_expert_gate\.weight")}
WRITES = (r"self_attn\.o_proj\.(weight|bias)", r"mlp\.down_proj\.(weight|bias)", r"mlp\.experts\.down_proj",
          r"mlp\.experts\.down\.\d+\.weight", r"mlp\.shared_expert\.down_proj\.(weight|bias)")
# parameters of a block outside the residual stream's path: the biases of layers reading it, per-head norms
# of queries and keys (Qwen3)
ASIDE = (r"self_attn\.(q|k|v|qkv)_proj\.bias", r"self_attn\.(q|k)_norm\.weight", r"(input|post_attention)_layernorm\.weight")
FOLD_TOLERANCE = 1e-4  # the rotated model's output, relative to the original's: float32 rounding, not a change


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, int(math.isqrt(q)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """The q x q matrix of the quadratic character of j - i modulo the prime q (float64)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in squares else -1 for i in range(1, q)], dtype=torch.float64)
    return chi[(torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q]


def paley(n: int) -> torch.Tensor | None:
    """Paley's Hadamard matrix of order n: n = q + 1 with q a prime 3 mod 4 (his first construction), or
    n = 2 (q + 1) with q a prime 1 mod 4 (his second: 28, 76, 148 for Llama-3's 14336, Qwen2's 4864 and
    18944); None for other n."""
    q = n - 1
    if q >= 3 and q % 4 == 3 and _is_prime(q):
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and q >= 5 and q % 4 == 1 and _is_prime(q):
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)  # a symmetric conference matrix
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
        one = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        return torch.kron(c, one) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)
    return None


@lru_cache(maxsize=64)
def hadamard_factors(n: int) -> tuple[torch.Tensor, ...] | None:
    """Hadamard matrices (float64) whose Kronecker product is `hadamard(n)`, the 2 x 2 ones of Sylvester's
    part and Paley's; None where no Hadamard matrix of order n is built here. A product by the factors
    one after the other costs n * (sum of their orders) rather than n * n (how an online rotation runs)."""
    if n in (1, 2):
        return (torch.tensor([[1.0]] if n == 1 else [[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64),)
    if n % 4:
        return None
    if (p := paley(n)) is not None:
        return (p,)
    for a in (2, *range(4, int(math.isqrt(n)) + 1, 4)):
        if n % a == 0 and (fa := hadamard_factors(a)) is not None and (fb := hadamard_factors(n // a)) is not None:
            return fa + fb
    return None


@lru_cache(maxsize=16)
def hadamard(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n (entries +-1, H H^T = n I; float64) or None where none is built here:
    Sylvester's for powers of two, Paley's (both constructions), and Kronecker products of those."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    found = factors[0]
    for f in factors[1:]:
        found = torch.kron(found, f)
    if not torch.equal(found @ found.T, n * torch.eye(n, dtype=torch.float64)):
        raise AssertionError(f"internal: the Hadamard matrix of order {n} is not one")
    return found


def orthogonal(n: int, seed: int) -> tuple[torch.Tensor, str]:
    """An n x n orthogonal matrix (float64) and what it is: a Hadamard matrix with random signs on its rows,
    scaled by 1/sqrt(n), or a random orthogonal matrix where no Hadamard matrix of order n is built."""
    g = torch.Generator().manual_seed(seed)
    h = hadamard(n)
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        return signs[:, None] * h / math.sqrt(n), f"hadamard {n} with random signs"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], f"random orthogonal {n} (no Hadamard matrix of that order here)"


def _rms_weight(norm: nn.Module, where: str) -> torch.Tensor:
    """The weight of an RMS normalisation computing x / rms(x) * weight (checked on a random input);
    ShrinkError naming `where` for any other (a bias, Gemma's 1 + weight, a LayerNorm's mean)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or getattr(norm, "bias", None) is not None:
        raise ShrinkError(f"cannot rotate: {where} ({type(norm).__name__}) is not an RMS normalisation with a weight")
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    x = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    with torch.no_grad():
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
        got = norm(x)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise ShrinkError(f"cannot rotate: {where} ({type(norm).__name__}) does not compute x / rms(x) * weight, so "
                          "its weight cannot be folded into the layers after it")
    return w.detach()


def _parts(model: nn.Module):
    """(embedding, blocks, final norm, output layer) of a Llama-shaped causal LM; ShrinkError naming what
    does not fit."""
    base = getattr(model, "model", None)
    need = {"model.embed_tokens": getattr(base, "embed_tokens", None), "model.layers": getattr(base, "layers", None),
            "model.norm": getattr(base, "norm", None), "lm_head": getattr(model, "lm_head", None)}
    missing = [n for n, m in need.items() if m is None]
    if missing:
        raise ShrinkError(f"cannot rotate {type(model).__name__}: it has no {missing[0]!r} (rotations fold into "
                          "Llama-shaped decoders: an embedding, blocks of attention and a gated MLP, RMS norms)")
    if not isinstance(need["model.embed_tokens"], nn.Embedding) or not isinstance(need["lm_head"], nn.Linear):
        raise ShrinkError("cannot rotate: the embedding or the output layer is not in full precision (rotate first, "
                          "then quantize)")
    return need["model.embed_tokens"], need["model.layers"], need["model.norm"], need["lm_head"]


def _roles(i: int, block: nn.Module) -> dict[str, str]:
    """{parameter name: its role} for block i: the norm it reads the stream through, "write", or "aside";
    ShrinkError naming a parameter that is none of these (refused rather than applied approximately)."""
    import re

    roles = {}
    for name, _ in block.named_parameters():
        role = next((norm for norm, pats in READS.items() if any(re.fullmatch(p, name) for p in pats)), None)
        if role is None and any(re.fullmatch(p, name) for p in WRITES):
            role = "write"
        if role is None and any(re.fullmatch(p, name) for p in ASIDE):
            role = "aside"
        if role is None:
            raise ShrinkError(f"cannot rotate: model.layers.{i}.{name} is a parameter the rotation does not fold "
                              "(rotations fold into Llama-shaped blocks; refused rather than applied approximately)")
        roles[name] = role
    for norm in READS:
        if not isinstance(getattr(block, norm, None), nn.Module):
            raise ShrinkError(f"cannot rotate: model.layers.{i} has no {norm}")
    if not any(r == "input_layernorm" for r in roles.values()) or not any(r == "write" for r in roles.values()):
        raise ShrinkError(f"cannot rotate: model.layers.{i} has no attention projections of Llama's names")
    return roles


def _set(p: nn.Parameter, value: torch.Tensor) -> None:
    # a new tensor, not a change in place: quantize's undo puts the old one back
    p.data = value.to(p.dtype).contiguous()


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def rotate_model(model: nn.Module, seed: int = 0) -> dict:
    """Rotate a Llama-shaped causal LM's residual stream and its attention values in place, the rotations
    folded into its weights (module docstring), and return the record of what was done: the residual and
    head rotations, the seed (default 0), the norms folded, whether the output layer was untied, and the
    fold's measured relative change of the output on a sample. ShrinkError, the model left as it was, for an
    architecture that cannot be folded exactly (naming the layer), weights not in float32, or a fold whose
    output differs beyond float rounding."""
    embed, blocks, final, head = _parts(model)
    roles = [_roles(i, block) for i, block in enumerate(blocks)]
    params = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.dtype != torch.float32 for p in params):
        raise ShrinkError("cannot rotate: the weights are not float32 (load the model in float32 first: the rotation "
                          "is exact only to float32 rounding)")
    hidden = embed.embedding_dim
    attn = blocks[0].self_attn
    head_dim = getattr(attn, "head_dim", None) or hidden // model.config.num_attention_heads
    vocab = embed.num_embeddings
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(seed))
    before = _logits(model, ids)

    norms = {f"model.layers.{i}.{n}": _rms_weight(b.get_submodule(n), f"model.layers.{i}.{n}")
             for i, b in enumerate(blocks) for n in READS}
    norms["model.norm"] = _rms_weight(final, "model.norm")
    kept = [(p, p.data) for p in model.parameters()], head.weight, model.config.tie_word_embeddings
    try:
        record = _fold(model, embed, blocks, roles, final, head, norms, hidden, head_dim, seed)
        after = _logits(model, ids)
        change = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
        if not change <= FOLD_TOLERANCE:
            raise ShrinkError(f"the rotated model's output differs from the original's by {change:.2e} (relative; "
                              f"float rounding is below {FOLD_TOLERANCE:g}): the rotation does not fold into this "
                              "model exactly")
    except BaseException:
        (data, head.weight, model.config.tie_word_embeddings) = kept
        for p, d in data:
            p.data = d
        raise
    return {**record, "fold_change": change}


def _rotate_heads(attn: nn.Module, h: torch.Tensor, head_dim: int, hidden: int) -> None:
    """Each head's values rotated by h (v's rows h^T W, within a fused qkv projection its last rows) and
    undone in the output projection's columns (W h)."""
    o = attn.o_proj
    if getattr(attn, "v_proj", None) is not None:
        v, first = attn.v_proj, 0
    else:  # Phi-3's qkv_proj: queries, keys, values
        v = attn.qkv_proj
        first = o.in_features + (v.out_features - o.in_features) // 2
    rows = v.out_features - first
    w = v.weight.double()
    w[first:] = (h.T[None] @ w[first:].reshape(rows // head_dim, head_dim, hidden)).reshape(rows, hidden)
    _set(v.weight, w)
    if v.bias is not None:
        b = v.bias.double()
        b[first:] = (h.T[None] @ b[first:].reshape(rows // head_dim, head_dim, 1)).reshape(-1)
        _set(v.bias, b)
    wo = o.weight.double().reshape(o.out_features, -1, head_dim)
    _set(o.weight, (wo @ h).reshape(o.out_features, -1))


def _fold(model, embed, blocks, roles, final, head, norms: dict, hidden: int, head_dim: int, seed: int) -> dict:
    """The folds of `rotate_model`, in place; the record without the check."""
    q, residual = orthogonal(hidden, seed)
    h, heads = orthogonal(head_dim, seed + 1)
    vocab = embed.num_embeddings
    untied = False
    if head.weight is embed.weight:
        if not torch.all(final.weight == 1):  # the table would have to be two matrices: untie, and say so
            head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
            untied = True
        # else: E Q serves both as the table and (the final norm all ones) the output layer: stays tied

    def reads(p: nn.Parameter, g: torch.Tensor) -> None:  # W diag(g) Q (each expert's, for 3-D experts)
        _set(p, (p.double() * g.double()) @ q)

    def writes(p: nn.Parameter) -> None:  # Q^T W (each expert's), Q^T b
        _set(p, q.T @ p.double())

    with torch.no_grad():
        for i, (block, role) in enumerate(zip(blocks, roles)):
            params = dict(block.named_parameters())
            for name, r in role.items():
                if r in READS:
                    reads(params[name], norms[f"model.layers.{i}.{r}"])
                elif r == "write":
                    writes(params[name])
            for norm_name in READS:
                _set(block.get_submodule(norm_name).weight, torch.ones_like(params[f"{norm_name}.weight"]))
            _rotate_heads(block.self_attn, h, head_dim, hidden)
        tied = head.weight is embed.weight
        _set(embed.weight, embed.weight.double() @ q)
        if not tied:
            reads(head.weight, norms["model.norm"])
        _set(final.weight, torch.ones_like(final.weight))
    record = {"residual": residual, "heads": heads, "seed": seed, "norms_folded": len(norms)}
    if untied:
        record["untied"] = (f"the output layer was tied to the embedding: untied, {vocab * hidden:,} more parameters "
                            "(the final norm's weight folds into the output layer, not into the table)")
    return record
