"""Focused linear attention (FLatten Transformer, Han et al., ICCV 2023) for timm ViT blocks.

The module mixes tokens in time linear in the token count N:

    O = φ(Q) (φ(K)ᵀ V) / (φ(Q) Σₙ φ(Kₙ)ᵀ) + DWC(V),

with heads as usual and these parts:

- **Positional encoding.** A learnable (1, N, C) tensor is added to k before φ, where
  C = heads · qk_dim is the width of all heads' q/k channels together.
- **Kernel and scale.** y = (ReLU(x) + 1e-6) / softplus(s), with s a learnable (1, 1, C) tensor
  that starts at zero (softplus(0) = ln 2).
- **Focusing.** φ(x) = f_p(y) = (‖y‖ / ‖yᵖ‖) · yᵖ, p = ``focusing_factor`` (3 by default). It keeps
  each token's norm and sharpens its direction towards its largest channels. The norms run over
  all C channels of a token, *before* the split into heads, so the map couples the heads: cutting
  one channel changes φ of every other channel, in every head.
- **Linear attention, in its fp16-safe form.** Per head, with n the token count:
  z = 1 / (q · meanₙ(k)ᵀ + 1e-6), kv = (kᵀ · n^-½) @ (v · n^-½), out = (q @ kv) · z. Scaling both
  factors of kv by n^-½ keeps it the size of a mean, not of a sum of n terms. The product with z
  is computed as a division in fp32: because φ normalises over all heads at once, a token can
  have one head's φ(q) underflow to zero in fp16, and then z = 1/1e-6 overflows fp16 and
  0 · inf = NaN, while 0 / 1e-6 in fp32 is 0. In fp32 the division is the same computation.
- **DWC.** One depthwise convolution (``kernel_size`` × ``kernel_size``, zero padding that keeps
  the grid) with v_dim channels, shared by all heads: each head's v is laid out on the patch grid
  and convolved with the same kernel. It restores the feature diversity that the low-rank
  attention map lacks.

Prefix tokens (class token, registers) are not on the patch grid. They take part in the linear
attention like any token (they attend and are attended to), and each gets its own row of the
positional encoding, so the encoding has one row per token the block sees
(``num_prefix_tokens`` + patches). The DWC runs over the patch tokens only; prefix tokens get no
DWC term.

Every width is explicit (``qk_dim`` and ``v_dim`` per head, independent of each other and of
dim / heads) and the qkv projection is one fused Linear laid out [q | k | v], head-major, as in
:class:`search.attention.softmax.PrunedAttention`, so a pruned copy is the same class with
smaller weights.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_EPS = 1e-6  # added after ReLU so that no channel of φ's input is exactly zero
NORMALISER_EPS = 1e-6  # keeps the normaliser q·mean(k) above zero when it underflows


def focused_feature_map(
    x: torch.Tensor, scale: torch.Tensor, focusing_factor: float
) -> torch.Tensor:
    """φ(x) = f_p((ReLU(x) + 1e-6) / softplus(scale)), norms over the whole last dimension.

    ``x`` holds all heads' channels side by side (…, C), so the norms couple the heads.

    f_p(y) = ‖y‖ · yᵖ / ‖yᵖ‖ is computed as ‖y‖ · (y/m)ᵖ / ‖(y/m)ᵖ‖ with m = maxᶜ y: the same value
    (yᵖ / ‖yᵖ‖ does not change when y is scaled), but (y/m)ᵖ lies in (0, 1] and its norm is at least 1.
    The literal form overflows yᵖ in fp16 for large y, and for a token whose channels are all
    negative (y ≈ 1e-6) it underflows yᵖ to zero and returns 0/0 = NaN.
    """
    y = (F.relu(x) + KERNEL_EPS) / F.softplus(scale)
    # m only rescales y, which f_p ignores, so no gradient needs to flow through it.
    m = y.detach().amax(dim=-1, keepdim=True)
    y_p = (y / m) ** focusing_factor
    return y_p * (y.norm(dim=-1, keepdim=True) / y_p.norm(dim=-1, keepdim=True))


class FocusedLinearAttention(nn.Module):
    """FLatten's focused linear attention with a DWC term, for a ViT with prefix tokens.

    ``reweight`` (identity unless recovery adds one) acts on the merged head outputs (after the
    DWC term) right before ``proj``, so it folds exactly into proj's weights before export.

    Args:
        dim: token width in and out.
        num_heads: number of heads.
        qk_dim: q/k channels per head.
        v_dim: v channels per head; also the DWC's channel count.
        grid_size: (rows, columns) of the patch grid.
        num_prefix_tokens: tokens before the patches (class token, registers).
        qkv_bias: whether the fused qkv projection has a bias.
        proj_bias: whether the output projection has a bias.
        focusing_factor: the power p of the focusing function.
        kernel_size: side of the DWC's square kernel (odd, so that padding keeps the grid).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        focusing_factor: float = 3,
        kernel_size: int = 5,
    ) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so that the DWC keeps the grid, got {kernel_size}")
        if num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")
        self.num_heads = num_heads
        self.qk_dim = qk_dim
        self.v_dim = v_dim
        self.head_dim = qk_dim
        self.grid_size = (int(grid_size[0]), int(grid_size[1]))
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.focusing_factor = focusing_factor
        width = num_heads * qk_dim
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.scale = nn.Parameter(torch.zeros(1, 1, width))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        self.dwc = nn.Conv2d(v_dim, v_dim, kernel_size, padding=kernel_size // 2, groups=v_dim)
        # The inputs of the focusing map, named so that the search can read and gate q and k
        # there (after the positional encoding, before φ); identities, so no op is exported.
        self.focus_q: nn.Module = nn.Identity()
        self.focus_k: nn.Module = nn.Identity()
        self.reweight: nn.Module = nn.Identity()
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)

    @classmethod
    def dense(
        cls, dim: int, num_heads: int, grid_size: tuple[int, int], num_prefix_tokens: int, **kwargs
    ) -> FocusedLinearAttention:
        """The unpruned module: q/k and v widths per head are both dim // num_heads."""
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        head_dim = dim // num_heads
        return cls(dim, num_heads, head_dim, head_dim, grid_size, num_prefix_tokens, **kwargs)

    @property
    def num_tokens(self) -> int:
        """Sequence length the module expects: prefix tokens plus patches."""
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def extra_repr(self) -> str:
        return (
            f"heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, grid={self.grid_size}, "
            f"prefix={self.num_prefix_tokens}, focusing_factor={self.focusing_factor}"
        )

    def _dwc_on_patches(self, v: torch.Tensor) -> torch.Tensor:
        """The shared DWC over the patch tokens of v (B, H, patches, v_dim), same shape out."""
        h, (rows, cols) = self.num_heads, self.grid_size
        grid = v.reshape(-1, rows, cols, self.v_dim).permute(0, 3, 1, 2)
        out = self.dwc(grid).flatten(2).transpose(1, 2)
        return out.reshape(-1, h, rows * cols, self.v_dim)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("focused linear attention has no attention matrix to mask")
        b, n, _ = x.shape
        if n != self.num_tokens:
            raise ValueError(
                f"got {n} tokens, but this attention was built for {self.num_prefix_tokens} prefix tokens "
                f"and a {self.grid_size[0]}x{self.grid_size[1]} patch grid ({self.num_tokens} tokens)"
            )
        h, p = self.num_heads, self.num_prefix_tokens
        q, k, v = self.qkv(x).split([h * self.qk_dim, h * self.qk_dim, h * self.v_dim], dim=-1)
        q = focused_feature_map(self.focus_q(q), self.scale, self.focusing_factor)
        k = focused_feature_map(self.focus_k(k + self.positional_encoding), self.scale, self.focusing_factor)
        q = q.reshape(b, n, h, self.qk_dim).transpose(1, 2)
        k = k.reshape(b, n, h, self.qk_dim).transpose(1, 2)
        v = v.reshape(b, n, h, self.v_dim).transpose(1, 2)

        kv = (k.transpose(-2, -1) * n**-0.5) @ (v * n**-0.5)
        numerator = q @ kv
        denominator = q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1)
        out = (numerator.float() / (denominator.float() + NORMALISER_EPS)).to(numerator.dtype)

        if p:
            out = torch.cat([out[:, :, :p], out[:, :, p:] + self._dwc_on_patches(v[:, :, p:])], dim=2)
        else:
            out = out + self._dwc_on_patches(v)
        return self.proj(self.reweight(out.transpose(1, 2).reshape(b, n, h * self.v_dim)))
