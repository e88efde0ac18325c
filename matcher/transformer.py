"""Transformer layers: LoFTR's linear-attention layer and the QuadTree block, and the interleaved
self / cross stacks built from them.

Tokens are ``(B, N, C)`` in row-major grid order; layers that need the grid take its ``(h, w)``.
Masks are ``(B, N)`` bool, False = padded token.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from . import onednn
from .attention import full_attention, linear_attention, num_levels_for, pool_levels, quadtree_attention
from .chunking import cpu_inference
from .conv_triton import relu_dwconv_gelu
from .triton_support import check_kernel_choice, kernel_device, use_kernel


def _heads(x: torch.Tensor, nhead: int) -> torch.Tensor:
    """``(B, N, C)`` -> ``(B, nhead, N, C / nhead)``."""
    b, n, c = x.shape
    return x.view(b, n, nhead, c // nhead).transpose(1, 2)


def _channels_last_grid(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Tokens ``(B, h * w, C)`` as a ``(B, C, h, w)`` view in channels-last memory order (no copy)."""
    return x.unflatten(1, hw).permute(0, 3, 1, 2)


def _grid_heads(x: torch.Tensor, nhead: int) -> torch.Tensor:
    """``(B, C, h, w)`` -> ``(B, nhead, h, w, C / nhead)`` (a view for channels-last input)."""
    return x.permute(0, 2, 3, 1).unflatten(-1, (nhead, -1)).permute(0, 3, 1, 2, 4)


def _zero_padded_tokens_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Contiguous tokens ``x (B, N, C)`` with the padded ones (``mask (B, N)`` False) set to zero in place: one
    write per padded token instead of a pass over the whole map (on a 200x152 grid with two padded rows, 20-50 ms
    per call for the MLP's hidden map on an AMD EPYC against 0.2 ms)."""
    x.view(-1, x.shape[-1]).index_fill_(0, (~mask).flatten().nonzero().squeeze(1), 0)
    return x


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, nhead, N, D)`` -> ``(B, N, nhead * D)``."""
    b, nh, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, nh * d)


class LoFTREncoderLayer(nn.Module):
    """LoFTR's post-norm layer: message = norm1(merge(attn)), x + norm2(mlp([x, message]))."""

    def __init__(self, d_model: int, nhead: int, attention: str = "linear") -> None:
        super().__init__()
        self.nhead = nhead
        self.attention = attention
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.merge = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(2 * d_model, 2 * d_model, bias=False), nn.ReLU(True), nn.Linear(2 * d_model, d_model, bias=False)
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        dense = lambda layer, t, activation=None: onednn.linear(t, layer.weight, layer.bias, activation)  # noqa: E731
        sources = ((self.q_proj, x), (self.k_proj, source), (self.v_proj, source))
        q, k, v = (_heads(dense(proj, t), self.nhead) for proj, t in sources)
        attend = linear_attention if self.attention == "linear" else full_attention
        message = self.norm1(dense(self.merge, _merge_heads(attend(q, k, v, source_mask))))
        hidden = dense(self.mlp[0], torch.cat([x, message], dim=-1), "relu")
        return x + self.norm2(dense(self.mlp[2], hidden))


class DepthwiseConv(nn.Module):
    """3x3 depthwise convolution over the token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=True)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], mask: torch.Tensor | None,
                activation: str | None = None) -> torch.Tensor:
        """``activation(conv(x))`` (:data:`~matcher.onednn.ACTIVATIONS`) on tokens ``(B, h * w, C)``."""
        b, n, c = x.shape
        if mask is not None:  # padded tokens read as zeros, like the border of an unpadded grid
            x = x * mask[..., None].to(x.dtype)
        # tokens viewed as a channels-last grid: no transposed copies (they cost more than the conv itself)
        conv = self.dwconv
        out = onednn.conv2d(_channels_last_grid(x, hw), conv.weight, conv.bias, 1, conv.groups, activation)
        return out.permute(0, 2, 3, 1).reshape(b, n, c)


class QuadtreeMLP(nn.Module):
    """fc1 -> ReLU -> depthwise 3x3 conv -> GELU -> fc2. ``kernel`` (:data:`~matcher.triton_support.KERNELS`):
    the middle three as one Triton kernel (:func:`~matcher.conv_triton.relu_dwconv_gelu`; ``auto``: on CUDA
    when triton is installed and no gradient is needed). Elsewhere the activations run inside the product
    before them (:mod:`matcher.onednn`, on CPU inference)."""

    def __init__(self, dim: int, hidden: int, kernel: str = "auto") -> None:
        super().__init__()
        check_kernel_choice(kernel)
        self.kernel = kernel
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int], mask: torch.Tensor | None) -> torch.Tensor:
        if self._use_fused_kernel(x):
            conv = self.dwconv.dwconv
            return self.fc2(relu_dwconv_gelu(self.fc1(x), hw, conv.weight, conv.bias, mask))
        hidden = onednn.linear(x, self.fc1.weight, self.fc1.bias, "relu")
        if mask is not None and hidden.is_contiguous() and cpu_inference(hidden, *self.parameters()):
            hidden, mask = _zero_padded_tokens_(hidden, mask), None  # our own map, outside autograd and tracing
        return onednn.linear(self.dwconv(hidden, hw, mask, "gelu"), self.fc2.weight, self.fc2.bias)

    def _use_fused_kernel(self, x: torch.Tensor) -> bool:
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *self.parameters()))
        requirements = ("the Triton MLP kernel needs no gradient, triton installed, float32 / float16 / bfloat16 tokens, "
                        f"a CUDA device (or TRITON_INTERPRET=1) and no tracing; got {x.dtype} on {x.device.type}")
        return use_kernel(self.kernel, not needs_grad and kernel_device(x), x.device, requirements)


class LevelMixture(nn.Module):
    """Holds the learnable level-mixture logits of QuadTree-B (``py_att.weight``, coarsest first)."""

    def __init__(self, num_levels: int, variant: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_levels)) if variant == "B" else None


class QuadtreeAttention(nn.Module):
    """q/k/v 1x1 convolutions, token pyramids, QuadTree attention, output projection.

    ``max_coarsest_tokens`` (None: off, the published behaviour): on grids whose coarsest level would hold
    more tokens, levels are added above the trained ones until it holds at most that many
    (:func:`~matcher.attention.num_levels_for`), so the cost stays linear in the number of tokens. They keep
    ``topks[0]`` keys per query. In variant B they carry no message (level weight 0): they only choose the
    candidates of the trained coarsest level, which then attends to the children of its queries' selected
    keys instead of to every key. In variant A, which has no level weights, they are levels like the others.
    """

    def __init__(
        self, dim: int, nhead: int, topks: list[int], variant: str = "B", kernel: str = "auto",
        max_coarsest_tokens: int | None = None,
    ) -> None:
        super().__init__()
        check_kernel_choice(kernel)
        self.nhead, self.topks, self.variant, self.kernel = nhead, list(topks), variant, kernel
        self.num_levels = len(topks)
        self.max_coarsest_tokens = max_coarsest_tokens
        self.q_proj = nn.Conv2d(dim, dim, 1, bias=False)
        self.k_proj = nn.Conv2d(dim, dim, 1, bias=False)
        self.v_proj = nn.Conv2d(dim, dim, 1, bias=False)
        self.py_att = LevelMixture(self.num_levels, variant)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        hw: tuple[int, int],
        source_hw: tuple[int, int],
        x_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
        return_selection: bool = False,
    ):
        project = lambda conv, t, t_hw: _channels_last_grid(onednn.linear(t, conv.weight.flatten(1)), t_hw)  # noqa: E731
        mask_x = None if x_mask is None else x_mask.reshape(-1, *hw)
        mask_s = None if source_mask is None else source_mask.reshape(-1, *source_hw)
        levels = num_levels_for(self.num_levels, self.max_coarsest_tokens, hw, source_hw)
        qs, _ = pool_levels(project(self.q_proj, x, hw), levels, mask_x)
        ks, kmasks = pool_levels(project(self.k_proj, source, source_hw), levels, mask_s)
        vs, _ = pool_levels(project(self.v_proj, source, source_hw), levels, mask_s)
        to_heads = lambda maps: [_grid_heads(m, self.nhead) for m in maps]  # noqa: E731
        added = levels - self.num_levels  # they keep as many keys as the trained coarsest level
        out = quadtree_attention(
            to_heads(qs), to_heads(ks), to_heads(vs), [self.topks[0]] * added + self.topks, self.variant,
            self.py_att.weight, kmasks, return_selection=return_selection, kernel=self.kernel,
            selection_only_levels=added if self.variant == "B" else 0,
        )
        message, selection = out if return_selection else (out, None)
        message = onednn.linear(_merge_heads(message), self.proj.weight, self.proj.bias)
        return (message, selection) if return_selection else message


class QuadtreeBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x), norm1(source)); x + mlp(norm2(x))."""

    def __init__(
        self, dim: int, nhead: int, topks: list[int], variant: str = "B", mlp_ratio: int = 4, kernel: str = "auto",
        max_coarsest_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = QuadtreeAttention(dim, nhead, topks, variant, kernel, max_coarsest_tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = QuadtreeMLP(dim, dim * mlp_ratio, kernel)

    def forward(
        self,
        x: torch.Tensor,
        source: torch.Tensor,
        hw: tuple[int, int],
        source_hw: tuple[int, int],
        x_mask: torch.Tensor | None = None,
        source_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        normed = self.norm1(x)
        normed_source = normed if source is x else self.norm1(source)
        x = x + self.attn(normed, normed_source, hw, source_hw, x_mask, source_mask)
        return x + self.mlp(self.norm2(x), hw, x_mask)


def init_xavier_(module: nn.Module) -> None:
    """LoFTR's initialisation of its transformer: Xavier uniform over every matrix (vectors keep theirs)."""
    for parameter in module.parameters():
        if parameter.dim() > 1:
            nn.init.xavier_uniform_(parameter)


def _init_quadtree_weights(module: nn.Module) -> None:
    """LoFTR-QuadTree's initialisation (its blocks are not reset by LoFTR's Xavier pass): linear maps and the
    attention's q/k/v 1x1 convolutions N(0, 0.02) truncated at +-2, the depthwise convolution N(0, 2 / fan_out)
    with fan_out = 9, biases 0, layer norms 1 and 0; the level-mixture logits stay N(0, 1)."""
    if isinstance(module, QuadtreeAttention):
        for conv in (module.q_proj, module.k_proj, module.v_proj):
            nn.init.trunc_normal_(conv.weight, std=0.02, a=-2.0, b=2.0)
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0)
    elif isinstance(module, DepthwiseConv):
        conv = module.dwconv
        fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
    if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)) and module.bias is not None:
        nn.init.zeros_(module.bias)


class LocalFeatureTransformer(nn.Module):
    """Interleaved self / cross layers over the tokens of two images.

    QuadTree blocks update both images of a cross layer from the previous features; LoFTR layers update
    image0 first and image1 from the updated image0, as LoFTR does.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        layer_names: list[str],
        attention: str,
        attn_type: str = "B",
        topks: list[int] | None = None,
        mlp_ratio: int = 4,
        kernel: str = "auto",
        max_coarsest_tokens: int | None = None,
    ) -> None:
        super().__init__()
        self.layer_names = list(layer_names)
        self.is_quadtree = attention == "quadtree"
        if self.is_quadtree:
            # as LoFTR-QuadTree: one block drawn once and copied, so every layer starts from the same weights
            block = QuadtreeBlock(d_model, nhead, list(topks), attn_type, mlp_ratio, kernel, max_coarsest_tokens)
            block.apply(_init_quadtree_weights)
        else:
            block = LoFTREncoderLayer(d_model, nhead, attention)
        self.layers = nn.ModuleList([copy.deepcopy(block) for _ in self.layer_names])
        if not self.is_quadtree:
            init_xavier_(self)  # LoFTR's layers are copies too, then drawn anew, each its own

    @property
    def max_coarsest_tokens(self) -> int | None:
        """The layers' bound on their coarsest QuadTree level (see :class:`QuadtreeAttention`); None for LoFTR
        layers."""
        return self.layers[0].attn.max_coarsest_tokens if self.is_quadtree else None

    def set_max_coarsest_tokens(self, tokens: int | None) -> None:
        """Set :attr:`max_coarsest_tokens` of every layer (nothing for LoFTR layers)."""
        if self.is_quadtree:
            for layer in self.layers:
                layer.attn.max_coarsest_tokens = tokens

    def padding_multiple(self, hw0: tuple[int, int], hw1: tuple[int, int]) -> int:
        """What both grid sides of a pair must be divisible by: ``2 ** (levels - 1)`` for QuadTree (its levels
        for these grids, :func:`~matcher.attention.num_levels_for`), else 1."""
        if not self.is_quadtree:
            return 1
        attn = self.layers[0].attn
        return 2 ** (num_levels_for(attn.num_levels, attn.max_coarsest_tokens, hw0, hw1) - 1)

    def forward(
        self,
        feat0: torch.Tensor,
        feat1: torch.Tensor,
        hw0: tuple[int, int] | None = None,
        hw1: tuple[int, int] | None = None,
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Args: feat0 ``(B, L0, C)``, feat1 ``(B, L1, C)``; grid sizes (QuadTree, divisible by
        :meth:`padding_multiple`); masks ``(B, L)`` bool. Returns the transformed tokens, same shapes."""
        return self._run(feat0, feat1, hw0, hw1, mask0, mask1, len(self.layers))

    def selection(
        self,
        feat0: torch.Tensor,
        feat1: torch.Tensor,
        hw0: tuple[int, int],
        hw1: tuple[int, int],
        layer_index: int,
        mask0: torch.Tensor | None = None,
        mask1: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Keys that image0's queries select at each level of QuadTree layer ``layer_index`` (coarsest
        first, each ``(B, nhead, N_l, K_l)`` indices into that level's source grid)."""
        if not self.is_quadtree:
            raise ValueError("attention selections exist for QuadTree attention only")
        if not 0 <= layer_index < len(self.layers):
            raise ValueError(f"layer_index must be in [0, {len(self.layers)}), got {layer_index}")
        feat0, feat1 = self._run(feat0, feat1, hw0, hw1, mask0, mask1, layer_index)
        layer, cross = self.layers[layer_index], self.layer_names[layer_index] == "cross"
        source, source_hw, source_mask = (feat1, hw1, mask1) if cross else (feat0, hw0, mask0)
        _, chosen = layer.attn(layer.norm1(feat0), layer.norm1(source), hw0, source_hw, mask0, source_mask, True)
        return chosen

    def _run(self, feat0, feat1, hw0, hw1, mask0, mask1, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_quadtree and _stackable(feat0, feat1, hw0, hw1, mask0, mask1):
            return self._run_stacked(feat0, feat1, hw0, mask0, mask1, num_layers)
        for layer, name in zip(self.layers[:num_layers], self.layer_names[:num_layers]):
            if self.is_quadtree:
                src0, src1 = (feat0, feat1) if name == "self" else (feat1, feat0)
                h0, h1 = (hw0, hw1) if name == "self" else (hw1, hw0)
                m0, m1 = (mask0, mask1) if name == "self" else (mask1, mask0)
                feat0, feat1 = layer(feat0, src0, hw0, h0, mask0, m0), layer(feat1, src1, hw1, h1, mask1, m1)
            elif name == "self":
                feat0, feat1 = layer(feat0, feat0, mask0), layer(feat1, feat1, mask1)
            else:
                feat0 = layer(feat0, feat1, mask1)
                feat1 = layer(feat1, feat0, mask0)
        return feat0, feat1

    def _run_stacked(self, feat0, feat1, hw, mask0, mask1, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """QuadTree layers on both images as one batch ``[image0; image1]`` (same grid): the same result as
        two calls, with half the kernel launches."""
        b = feat0.shape[0]
        feats = torch.cat([feat0, feat1])
        masks = None if mask0 is None else torch.cat([mask0, mask1])
        swapped_masks = None if mask0 is None else torch.cat([mask1, mask0])
        for layer, name in zip(self.layers[:num_layers], self.layer_names[:num_layers]):
            if name == "self":
                feats = layer(feats, feats, hw, hw, masks, masks)
            else:  # each image attends to the other one
                feats = layer(feats, feats.roll(b, dims=0), hw, hw, masks, swapped_masks)
        return feats[:b], feats[b:]


def _stackable(feat0, feat1, hw0, hw1, mask0, mask1) -> bool:
    """Whether both images' tokens can go through the layers as one batch."""
    return hw0 == hw1 and feat0.shape == feat1.shape and (mask0 is None) == (mask1 is None)
