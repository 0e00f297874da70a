"""Small hand-built models, one per architecture pattern that student derivation must handle:
each reproduces, at a few thousand parameters, the block of a real family (timm/torchvision)."""

from __future__ import annotations

import torch
from models import _init
from torch import nn


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, LayerNorm over channels (channel-last), MLP, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


class CSPNet(nn.Module):
    """Cross-stage partial block: split the channels, transform one half, concatenate."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(dim // 2, dim // 2, 3, padding=1), nn.BatchNorm2d(dim // 2), nn.ReLU(),
            nn.Conv2d(dim // 2, dim // 2, 3, padding=1), nn.ReLU(),
        )  # fmt: skip
        self.transition = nn.Conv2d(dim, 2 * dim, 1)
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.stem(x)
        part1, part2 = x.chunk(2, dim=1)
        x = self.transition(torch.cat([part1, self.block(part2)], dim=1))
        return self.head(x.mean((2, 3)))


class DualPathNet(nn.Module):
    """DPN: the block's output is split into a residual part (added) and a dense part
    (concatenated to the running dense features)."""

    def __init__(self, res: int = 24, grow: int = 8, classes: int = 10):
        super().__init__()
        self.res = res
        self.stem = nn.Sequential(nn.Conv2d(3, res + grow, 3, stride=2, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(res + grow, res + grow, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(res + 2 * grow, res + grow, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(res + 3 * grow, classes)

    def _dual(self, x, block):
        out = block(x)
        residual = x[:, : self.res] + out[:, : self.res]
        dense = torch.cat([x[:, self.res :], out[:, self.res :]], dim=1)
        return torch.cat([residual, dense], dim=1)

    def forward(self, x):
        x = self._dual(self._dual(self.stem(x), self.block1), self.block2)
        return self.head(x.mean((2, 3)))


class PaddedResidualNet(nn.Module):
    """ReXNet: a block widens the channels and adds its input into the first ones."""

    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(dim, 2 * dim, 1), nn.ReLU(), nn.Conv2d(2 * dim, 2 * dim, 3, padding=1)
        )
        self.head = nn.Linear(2 * dim, classes)

    def forward(self, x):
        x = self.stem(x)
        out = self.block(x)
        c = x.shape[1]
        out = torch.cat([out[:, :c] + x, out[:, c:]], dim=1)
        return self.head(out.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.num_heads = heads  # timm's names: make_student reads them
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (dim // self.num_heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, length, dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """ViT: patch embedding, a class token, position embeddings, two blocks, head on the token."""

    def __init__(self, dim: int = 32, heads: int = 4, patch: int = 8, size: int = 32,
                 classes: int = 10):  # fmt: skip
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(TransformerBlock(dim, heads), TransformerBlock(dim, heads))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


class GhostModule(nn.Module):
    """GhostNet: half the outputs from a conv, the other half from a cheap depthwise conv."""

    def __init__(self, inp: int, out: int):
        super().__init__()
        self.out = out
        self.primary = nn.Sequential(nn.Conv2d(inp, out // 2, 1), nn.BatchNorm2d(out // 2),
                                     nn.ReLU())  # fmt: skip
        self.cheap = nn.Sequential(nn.Conv2d(out // 2, out // 2, 3, padding=1, groups=out // 2),
                                   nn.BatchNorm2d(out // 2), nn.ReLU())  # fmt: skip

    def forward(self, x):
        primary = self.primary(x)
        return torch.cat([primary, self.cheap(primary)], dim=1)[:, : self.out]


class SqueezeExcite(nn.Module):
    """timm's squeeze-excite with GhostNet's hard-sigmoid gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.reduce = nn.Conv2d(dim, dim // 4, 1)
        self.expand = nn.Conv2d(dim // 4, dim, 1)

    def forward(self, x):
        scale = self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True))))
        return x * nn.functional.hardsigmoid(scale)


class GhostNet(nn.Module):
    """A GhostNet bottleneck: ghost module, squeeze-excite over its concatenated output (the
    SE's expanding conv once rooted the pruning group: nothing was pruned), ghost module."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.ReLU())
        self.ghost1 = GhostModule(dim, 2 * dim)
        self.se = SqueezeExcite(2 * dim)
        self.ghost2 = GhostModule(2 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.ghost2(self.se(self.ghost1(x)))
        return self.head(x.mean((2, 3)))


class SmallInputVGG(nn.Module):
    """VGG/AlexNet on a small input: adaptive pooling from 2x2 up to 3x3, which exporters
    cannot write as one op, then a flatten into the classifier."""

    def __init__(self, dim: int = 16, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, dim, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(dim, 2 * dim, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.classifier = nn.Sequential(nn.Linear(2 * dim * 9, 32), nn.ReLU(),
                                        nn.Linear(32, classes))  # fmt: skip

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


class SplitHeadAttention(nn.Module):
    """EfficientFormer's and LeViT's attention: each head's query, key and value cut from one
    projection in unequal parts (keys 8 wide, values 16)."""

    def __init__(self, dim: int, heads: int = 2, key: int = 8, value: int = 16):
        super().__init__()
        self.heads, self.key, self.value = heads, key, value
        self.qkv = nn.Linear(dim, heads * (2 * key + value))
        self.proj = nn.Linear(heads * value, dim)

    def forward(self, x):
        batch, tokens, _ = x.shape
        parts = self.qkv(x).reshape(batch, tokens, self.heads, -1).permute(0, 2, 1, 3)
        q, k, v = parts.split([self.key, self.key, self.value], dim=3)
        attention = ((q @ k.transpose(-2, -1)) * self.key**-0.5).softmax(-1)
        return self.proj((attention @ v).transpose(1, 2).reshape(batch, tokens, -1))


class SplitHeadFormer(nn.Module):
    """EfficientFormer: convolutional stages, then tokens through split-head attention."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dim, 4, stride=4), nn.BatchNorm2d(dim), nn.ReLU(),
                                  nn.Conv2d(dim, dim, 3, padding=1), nn.BatchNorm2d(dim),
                                  nn.ReLU())  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.attention = SplitHeadAttention(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = x + self.attention(self.norm(x))
        x = x + self.mlp(x)
        return self.head(x.mean(1))


class PoolFormerNet(nn.Module):
    """PoolFormer: GroupNorm(1, C) (exported as reshape, instance norm, reshape back and the
    affine), pooling minus identity as the token mixer, a 1x1-conv MLP, layer scales; timm's
    head: pooled, LayerNorm over channels between two permutes, flattened."""

    def __init__(self, dim: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.norm1, self.norm2 = nn.GroupNorm(1, dim), nn.GroupNorm(1, dim)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 2 * dim, 1), nn.GELU(), nn.Conv2d(2 * dim, dim, 1))
        self.scale = nn.Parameter(torch.full((dim, 1, 1), 0.5))
        self.head_norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.norm1(x)
        x = x + self.scale * (self.pool(y) - y)
        x = x + self.mlp(self.norm2(x))
        x = nn.functional.adaptive_avg_pool2d(x, 1)
        x = self.head_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(x.flatten(1))


PATTERNS = {
    "convnext": ConvNeXtTiny,
    "csp": CSPNet,
    "dual-path": DualPathNet,
    "padded-residual": PaddedResidualNet,
    "vit": TinyViT,
    "ghost": GhostNet,
    "small-input-vgg": SmallInputVGG,
    "split-head-attention": SplitHeadFormer,
    "poolformer": PoolFormerNet,
}
SHAPE = (3, 32, 32)


def pattern(name: str) -> nn.Module:
    return _init(PATTERNS[name]())
