"""Odd models for pruning tests: each exercises one dimension rule the HF zoo may not."""

import torch
import torch.nn.functional as F
from torch import nn


class ConcatSkip(nn.Module):
    """Two branches concatenated on channels, then a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(14)
        self.mix = nn.Conv2d(14, 10, 1)
        self.head = nn.Conv2d(10, 4, 1)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.head(F.relu(self.mix(F.relu(self.bn(y)))))


class ChunkGate(nn.Module):
    """SwiGLU with one packed projection split by chunk (gate | up)."""

    def __init__(self, d=16, hidden=24):
        super().__init__()
        self.proj = nn.Linear(d, 2 * hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        gate, up = self.proj(x).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class TiedLM(nn.Module):
    """Embedding tied to the output projection, with a hidden MLP in between."""

    def __init__(self, vocab=50, d=16, hidden=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids):
        h = self.emb(ids)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.out(h)


class DepthwiseSE(nn.Module):
    """MobileNet-style inverted residual with squeeze-excitation."""

    def __init__(self, c=8, expand=24, squeeze=6):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.expand = nn.Conv2d(c, expand, 1)
        self.bn1 = nn.BatchNorm2d(expand)
        self.dw = nn.Conv2d(expand, expand, 3, padding=1, groups=expand)
        self.bn2 = nn.BatchNorm2d(expand)
        self.se_reduce = nn.Conv2d(expand, squeeze, 1)
        self.se_expand = nn.Conv2d(squeeze, expand, 1)
        self.project = nn.Conv2d(expand, c, 1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        s = y.mean((2, 3), keepdim=True)
        y = y * torch.sigmoid(self.se_expand(F.relu(self.se_reduce(s))))
        x = x + self.project(y)
        return self.head(x.mean((2, 3)))


class GQARepeatInterleave(nn.Module):
    """Grouped-query attention that shares k/v heads with repeat_interleave."""

    def __init__(self, d=32, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, d // heads
        self.q = nn.Linear(d, heads * self.hd)
        self.k = nn.Linear(d, kv_heads * self.hd)
        self.v = nn.Linear(d, kv_heads * self.hd)
        self.o = nn.Linear(heads * self.hd, d)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.hd).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(out.transpose(1, 2).reshape(b, s, -1))


class WithMHA(nn.Module):
    """torch's nn.MultiheadAttention followed by an MLP."""

    def __init__(self, d=16, heads=4, hidden=32):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        x = x + a
        return x + self.fc2(F.relu(self.fc1(x)))


ODD_MODELS = {
    "concat_skip": (ConcatSkip, lambda: torch.randn(2, 3, 8, 8)),
    "chunk_gate": (ChunkGate, lambda: torch.randn(2, 5, 16)),
    "tied_lm": (TiedLM, lambda: torch.randint(0, 50, (2, 7))),
    "depthwise_se": (DepthwiseSE, lambda: torch.randn(2, 3, 8, 8)),
    "gqa_repeat_interleave": (GQARepeatInterleave, lambda: torch.randn(2, 6, 32)),
    "mha": (WithMHA, lambda: torch.randn(2, 6, 16)),
}


def randomize_norms(model: nn.Module) -> None:
    """Give BatchNorms non-trivial statistics so tests are not fooled by identity norms."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
