"""Image encoders built on timm Vision Transformers.

* :class:`RSEncoder`: the remote-sensing ViT (Sentinel-2, patch 8, 96 px, 10 bands, no CLS token). It exposes the
  token grid as ``B x D x Hg x Wg`` (:meth:`RSEncoder.forward_tokens`); the global RS embedding is the mean of the
  tokens (:meth:`RSEncoder.forward_global`).
* :class:`SVEncoder`: the street-view ViT-B/16 at 224 px; CLS token -> Linear + tanh pooler -> Linear projection.

Both are randomly initialised by default (``pretrained=False``; nothing is ever downloaded) and can load a local
state-dict / safetensors file with :func:`load_local_weights`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

#: Known timm ViT architectures by short size name.
VIT_ARCHS: dict[str, str] = {
    "tiny": "vit_tiny_patch16_224",
    "small": "vit_small_patch16_224",
    "base": "vit_base_patch16_224",
    "large": "vit_large_patch16_224",
}


def _arch_name(arch: str) -> str:
    return VIT_ARCHS.get(arch, arch)


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict", "encoder"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not contain a state dict")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _resample_pos_embed(value: torch.Tensor, target: torch.Tensor, n_prefix: int) -> torch.Tensor:
    """Resample a ``1 x N x D`` absolute position embedding to the square grid of ``target``."""
    n_old = value.shape[1]
    old_prefix = next((p for p in (0, 1) if math.isqrt(n_old - p) ** 2 == n_old - p), None)
    new_grid = math.isqrt(target.shape[1] - n_prefix)
    if old_prefix is None or new_grid**2 != target.shape[1] - n_prefix or value.shape[2] != target.shape[2]:
        return value
    old_grid = math.isqrt(n_old - old_prefix)
    grid = value[:, old_prefix:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(value.dtype)
    if n_prefix:
        prefix = value[:, :old_prefix] if old_prefix == n_prefix else target[:, :n_prefix]
        grid = torch.cat([prefix, grid], dim=1)
    return grid


def load_local_weights(
    module: nn.Module,
    path: str | Path,
    *,
    prefix: str = "",
    strict: bool = False,
) -> tuple[list[str], list[str]]:
    """Load a local weights file into ``module`` (never downloads).

    Keys starting with ``prefix`` are selected and the prefix is stripped (e.g. ``prefix="encoder."`` for a
    checkpoint of a larger model). A common ``module.`` prefix (DDP) is stripped too. Absolute position embeddings
    of a different grid size are resampled; tensors whose shape still differs are skipped with a warning.

    Args:
        module: Target module (e.g. a timm ViT).
        path: ``.safetensors`` file or a torch-saved state dict (loaded with ``weights_only=True``).
        prefix: Only keys starting with this prefix are used, with the prefix removed.
        strict: Raise if any key is missing or unexpected.

    Returns:
        ``(missing_keys, unexpected_keys)`` as reported by ``load_state_dict``.
    """
    state = _read_state_dict(path)
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = module.state_dict()
    filtered: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            if key.endswith("pos_embed") and value.ndim == 3:
                # The resampled position embedding replaces the loaded one.
                value = _resample_pos_embed(value, own[key], getattr(module, "num_prefix_tokens", 0))  # noqa: PLW2901
            if own[key].shape != value.shape:
                logger.warning("skipping %s: shape %s != %s", key, tuple(value.shape), tuple(own[key].shape))
                continue
        filtered[key] = value
    result = module.load_state_dict(filtered, strict=strict)
    logger.info(
        "loaded %d tensors from %s (missing %d, unexpected %d)",
        len(filtered),
        path,
        len(result.missing_keys),
        len(result.unexpected_keys),
    )
    return list(result.missing_keys), list(result.unexpected_keys)


def _build_vit(arch: str, img_size: int, patch_size: int, in_chans: int, drop_path_rate: float,
               weights: str | Path | None, weights_prefix: str, **timm_kwargs: Any) -> VisionTransformer:
    """A randomly initialised timm ViT (never downloaded), then the local weights file if one is given."""
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    # create_model is typed as returning nn.Module; the callers pass ViT architectures (VIT_ARCHS or vit_* names).
    model = timm.create_model(_arch_name(arch), pretrained=False, img_size=img_size, patch_size=patch_size,
                              in_chans=in_chans, num_classes=0, drop_path_rate=drop_path_rate, **timm_kwargs)
    vit = cast(VisionTransformer, model)
    if weights:
        load_local_weights(vit, weights, prefix=weights_prefix)
    return vit


class RSEncoder(nn.Module):
    """Remote-sensing ViT without CLS token whose token grid is exposed.

    Args:
        arch: timm architecture or size name (``tiny``, ``small``, ``base``, ``large``).
        img_size: Input size in pixels (96 in the paper).
        patch_size: Patch size (8 in the paper, giving a 12 x 12 grid at 96 px).
        in_chans: Number of spectral bands (10 by default).
        weights: Optional local weights file (state dict or safetensors). Nothing is downloaded.
        weights_prefix: Key prefix selecting the encoder inside ``weights``.
        drop_path_rate: Stochastic depth rate.
    """

    def __init__(
        self,
        arch: str = "base",
        *,
        img_size: int = 96,
        patch_size: int = 8,
        in_chans: int = 10,
        weights: str | Path | None = None,
        weights_prefix: str = "",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        # fc_norm=False: the final norm applies to every token, so the grid is normalised.
        self.vit = _build_vit(arch, img_size, patch_size, in_chans, drop_path_rate, weights, weights_prefix,
                              class_token=False, global_pool="avg", fc_norm=False)
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim: int = self.vit.embed_dim
        self.grid_size: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)  # (Hg, Wg)

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Encode an RS chip into its token grid.

        Args:
            x: ``B x C x H x W`` float tensor.

        Returns:
            ``B x D x Hg x Wg`` token grid (row 0 is the top of the image, column 0 the west/left edge).
        """
        tokens = self.vit.forward_features(x)  # B x N x D, no prefix tokens
        b, n, d = tokens.shape
        hg, wg = self.grid_size
        if n != hg * wg:
            raise ValueError(f"expected {hg * wg} tokens, got {n}")
        return tokens.transpose(1, 2).reshape(b, d, hg, wg)

    @staticmethod
    def global_from_tokens(grid: torch.Tensor) -> torch.Tensor:
        """Global RS embedding: the mean of the tokens of a ``B x D x Hg x Wg`` grid."""
        return grid.mean(dim=(2, 3))

    def forward_global(self, x: torch.Tensor) -> torch.Tensor:
        """Global RS embedding (``B x D``), the mean of the tokens."""
        return self.global_from_tokens(self.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`forward_tokens`."""
        return self.forward_tokens(x)


class SVEncoder(nn.Module):
    """Street-view ViT: CLS token -> Linear + tanh pooler -> Linear projection.

    Args:
        arch: timm architecture or size name.
        img_size: Input size (224 in the paper).
        patch_size: Patch size (16 in the paper).
        out_dim: Output embedding dimension (defaults to the ViT width).
        weights: Optional local weights file for the ViT backbone.
        weights_prefix: Key prefix selecting the backbone inside ``weights``.
        drop_path_rate: Stochastic depth rate.
    """

    def __init__(
        self,
        arch: str = "base",
        *,
        img_size: int = 224,
        patch_size: int = 16,
        out_dim: int | None = None,
        weights: str | Path | None = None,
        weights_prefix: str = "",
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.vit = _build_vit(arch, img_size, patch_size, 3, drop_path_rate, weights, weights_prefix,
                              class_token=True, global_pool="token")
        self.img_size = img_size
        self.embed_dim: int = self.vit.embed_dim
        self.out_dim: int = out_dim or self.embed_dim
        self.pooler = nn.Sequential(nn.Linear(self.embed_dim, self.embed_dim), nn.Tanh())
        self.proj = nn.Linear(self.embed_dim, self.out_dim)

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone CLS token (``B x D``, after the final norm)."""
        return self.vit.forward_features(x)[:, 0]

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """CLS token through the Linear + tanh pooler (``B x D``)."""
        return self.pooler(self.forward_cls(x))

    def head(self, cls: torch.Tensor) -> torch.Tensor:
        """Pooler + projection applied to a CLS token (``B x D`` -> ``B x out_dim``)."""
        return self.proj(self.pooler(cls))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projected SV embedding (``B x out_dim``), not normalised."""
        return self.head(self.forward_cls(x))
