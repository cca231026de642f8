"""The reference notebook's PyTorch model, written to the report's spec.

The tests compare this project's model and optimiser with it, and the benchmark trains it the
reference's way. It needs torch, which the project itself does not (`pip install -e ".[torch]"`).
"""

import math

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, d_model, n_heads):
        super().__init__()
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, causal_mask):
        b, length, _ = x.shape
        qkv = self.qkv_proj(x).reshape(b, length, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        scores = scores.masked_fill(causal_mask[None, None] == 0, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(b, length, self.d_model)
        return self.out_proj(out), weights


class TransformerBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff, seq_len):
        super().__init__()
        self.attn = MultiHeadSelfAttention(d_model, n_heads)
        self.norm1, self.norm2 = RMSNorm(d_model), RMSNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.register_buffer("causal_mask", torch.tril(torch.ones(seq_len, seq_len)))

    def forward(self, x):
        length = x.size(1)
        attn_out, weights = self.attn(self.norm1(x), self.causal_mask[:length, :length])
        x = x + attn_out
        return x + self.ff(self.norm2(x)), weights


class TinyTransformerLM(nn.Module):
    def __init__(self, vocab_size, d_model, n_heads, d_ff, max_seq_len, n_layers):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        pos = torch.arange(max_seq_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_seq_len, d_model)
        pe[:, 0::2] = torch.sin(pos * div_term)
        pe[:, 1::2] = torch.cos(pos * div_term)
        self.register_buffer("pos_encoding", pe.unsqueeze(0))
        self.layers = nn.ModuleList(TransformerBlock(d_model, n_heads, d_ff, max_seq_len)
                                    for _ in range(n_layers))
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x, return_attn=False):
        h = self.token_embedding(x) + self.pos_encoding[:, : x.size(1)]
        attention = []
        for layer in self.layers:
            h, weights = layer(h)
            attention.append(weights)
        logits = self.head(self.norm(h))
        return (logits, attention) if return_attn else logits


def reference_windows(ids, seq_len):
    """The reference's data path: every window materialised, inputs and targets, each (N, L)
    int64."""
    ids = torch.tensor(ids, dtype=torch.long)  # a copy: jax hands out read-only arrays
    count = len(ids) - seq_len
    inputs = torch.stack([ids[i:i + seq_len] for i in range(count)])
    targets = torch.stack([ids[i + 1:i + seq_len + 1] for i in range(count)])
    return inputs, targets
