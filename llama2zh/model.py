"""The Llama-2 model in PyTorch, as llama2.c builds it.

RMSNorm, rotary embeddings on interleaved pairs, grouped-query attention through
scaled_dot_product_attention, a SwiGLU feed-forward, and a classifier that is either
the token embedding (shared) or its own matrix. Parameter names follow llama2.c's
model.py, so its checkpoints and export order carry over unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelArgs:
    dim: int = 288
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 6
    vocab_size: int = 32000
    hidden_dim: int = 768
    max_seq_len: int = 256
    shared_classifier: bool = True
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head size {self.dim // self.n_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)


def llama_hidden_dim(dim: int, multiple_of: int = 32) -> int:
    """llama2.c's SwiGLU width: 2/3 of 4*dim, rounded up to a multiple."""
    hidden = int(2 * (4 * dim) / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


ROPE_THETA = 10000.0  # llama2.c's, fixed in csrc/model.c too: model.bin does not carry it


def rope_tables(head_dim: int, seq_len: int, theta: float = ROPE_THETA) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, shape (seq_len, head_dim // 2)."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates the pairs (x[2i], x[2i+1]) of every head; x is (B, T, heads, head_dim)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs.unbind(-1)
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = torch.stack((real * cos - imag * sin, real * sin + imag * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KVCache:
    """Keys and values of the positions seen so far, one pair of tensors per layer."""

    def __init__(self, args: ModelArgs, batch: int, device=None, dtype=torch.float32):
        shape = (batch, args.n_kv_heads, args.max_seq_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, layer: int, start_pos: int, cache: KVCache | None, mask=None):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)

        causal = seq > 1 and mask is None
        if cache is not None:
            end = start_pos + seq
            cache.k[layer][:batch, :, start_pos:end] = k
            cache.v[layer][:batch, :, start_pos:end] = v
            k, v = cache.k[layer][:batch, :, :end], cache.v[layer][:batch, :, :end]
            if start_pos > 0 and seq > 1:  # a block of queries after cached positions
                mask = torch.ones(seq, end, dtype=torch.bool, device=x.device).tril(start_pos)
                causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer: int, args: ModelArgs):
        super().__init__()
        self.layer = layer
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, start_pos, cache, mask=None):
        x = x + self.attention(self.attention_norm(x), cos, sin, self.layer, start_pos, cache, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.shared_classifier:
            self.output.weight = self.tok_embeddings.weight
        freqs_cos, freqs_sin = rope_tables(args.head_dim, args.max_seq_len)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """llama2.c's initialisation: N(0, 0.02), the residual projections scaled by depth."""
        residual_std = 0.02 / math.sqrt(2 * self.args.n_layers)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(param)
            else:
                std = residual_std if name.endswith(("w3.weight", "wo.weight")) else 0.02
                nn.init.normal_(param, mean=0.0, std=std, generator=generator)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                segments: torch.Tensor | None = None, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T) placed at positions start_pos.. start_pos+T-1.

        segments (B, T), for rows that pack several sequences: a token attends only to earlier
        tokens of its own segment. Rotary embeddings see only relative positions, so a packed
        sequence gets the logits it would get alone at position 0.
        targets (B, T): instead of the logits, their mean cross-entropy (float32) over the targets
        that are not -1. In here, so that torch.compile fuses the log-softmax over the vocab into
        the classifier's output instead of writing the float32 logits out and reading them back."""
        seq = tokens.shape[1]
        if start_pos + seq > self.args.max_seq_len:
            raise ValueError(f"positions up to {start_pos + seq} exceed max_seq_len {self.args.max_seq_len}")
        cos = self.freqs_cos[start_pos : start_pos + seq]
        sin = self.freqs_sin[start_pos : start_pos + seq]
        mask = None
        if segments is not None:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
            mask = (segments[:, None, :, None] == segments[:, None, None, :]) & causal
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, start_pos, cache, mask)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def extended(self, new_tokens: int = 0, max_seq_len: int | None = None) -> Transformer:
        """A copy with new_tokens more token ids at the end and another context length, every
        existing weight kept: old ids give the same logits. The new rows of the embedding (and
        of an unshared classifier) are the mean of the old rows, a neutral start for sft."""
        args = replace(self.args, vocab_size=self.args.vocab_size + new_tokens,
                       max_seq_len=max_seq_len or self.args.max_seq_len)
        state = self.state_dict()
        with torch.no_grad():
            for name in ("tok_embeddings.weight", "output.weight"):
                state[name] = torch.cat([state[name], state[name].mean(0, keepdim=True).expand(new_tokens, -1)])
        extended = Transformer(args)
        extended.load_state_dict(state)
        return extended

    @torch.inference_mode()
    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 0.9,
        stop_ids: tuple[int, ...] = (),
        generator: torch.Generator | None = None,
        cache: KVCache | None = None,
        start_pos: int = 0,
        on_token=None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
    ) -> list[int]:
        """Continues prompt (ids, BOS included) by up to max_new_tokens tokens.

        The prompt goes through once, at positions start_pos.. of cache (a new one when None);
        every new token then reuses the cache. Stops before the first stop id, like the C
        engine; never runs past max_seq_len. Every token returned is in the cache except the
        last when it stopped on the token limit (as in the C engine's l2_generate). on_token,
        when given, is called with each token as it is generated. The penalties are OpenAI's,
        over the tokens generated in this call (see penalize).
        """
        if not prompt:
            raise ValueError("generate needs at least one prompt token (BOS)")
        device = self.tok_embeddings.weight.device
        if cache is None:
            cache = KVCache(self.args, batch=1, device=device, dtype=self.tok_embeddings.weight.dtype)
        pos = start_pos + len(prompt)
        max_new_tokens = min(max_new_tokens, self.args.max_seq_len - pos + 1)
        logits = self(torch.tensor([prompt], device=device), start_pos, cache)[0, -1]
        out = []
        counts = torch.zeros(self.args.vocab_size, device=device)
        while len(out) < max_new_tokens:
            if presence_penalty or frequency_penalty:
                logits = penalize(logits, counts, presence_penalty, frequency_penalty)
            token = sample_token(logits, temperature, top_p, generator)
            counts[token] += 1
            if token in stop_ids:
                break
            out.append(token)
            if on_token:
                on_token(token)
            if len(out) == max_new_tokens:
                break
            logits = self(torch.tensor([[token]], device=device), pos, cache)[0, -1]
            pos += 1
        return out


def penalize(logits: torch.Tensor, counts: torch.Tensor, presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's penalties: each token's logit less frequency times the times it was generated so
    far, and less presence once if it was; in float32 and in this order, as csrc/sampler.c."""
    penalty = counts * frequency + (counts > 0).float() * presence
    return logits.float() - penalty


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> int:
    """Greedy when temperature is 0; else softmax(logits / T), restricted to the top-p nucleus."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < top_p  # the smallest prefix reaching top_p
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
