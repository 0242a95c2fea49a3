"""Image encoders built on timm Vision Transformers.

* :class:`RSEncoder`: the remote-sensing ViT (Sentinel-2, patch 8, 96 px, 10 bands, no CLS token). It exposes the
  token grid as ``B x D x Hg x Wg`` (:meth:`RSEncoder.forward_tokens`); the global RS embedding is the mean of the
  tokens (:meth:`RSEncoder.forward_global`).
* :class:`SVEncoder`: the street-view ViT-B/16 at 224 px; CLS token -> Linear + tanh pooler -> Linear projection.
* :class:`FrozenTeacher` and :func:`build_teachers`: the frozen distillation targets (the authors: a frozen copy of
  the pretrained RS encoder, and an ImageNet-21k ViT-B/16 for SV), loaded from local files only.

Both are randomly initialised by default (``pretrained=False``; nothing is ever downloaded) and can load a local
state-dict / safetensors file with :func:`load_local_weights`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from gair_model.models.gair import GAIRConfig

logger = logging.getLogger(__name__)

#: Values of ``GAIRConfig.sv_distill_feature``: the SV feature that is distilled towards the teacher.
SV_DISTILL_FEATURES: tuple[str, ...] = ("pooled", "cls")

#: Key suffixes of a Linear + tanh pooler inside a weights file (HuggingFace ViT, and this project's SVEncoder).
_POOLER_KEYS: tuple[str, ...] = ("pooler.dense.", "pooler.0.")

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


def load_local_pooler(pooler: nn.Module, path: str | Path) -> bool:
    """Load a Linear + tanh pooler from a local weights file, if it holds exactly one.

    Looks for ``...pooler.dense.weight`` / ``.bias`` (HuggingFace ``ViTModel``, e.g. the ImageNet-21k ViT-B/16 the
    authors use) or ``...pooler.0.weight`` / ``.bias`` (an :class:`SVEncoder` or a GAIR checkpoint).

    Args:
        pooler: ``nn.Sequential(nn.Linear(D, D), nn.Tanh())``.
        path: ``.safetensors`` or torch state-dict file.

    Returns:
        Whether pooler weights were found and loaded.
    """
    state = _read_state_dict(path)
    linear = cast(nn.Linear, cast(nn.Sequential, pooler)[0])
    found = []
    for key in state:
        for stem in _POOLER_KEYS:
            if key.endswith(stem + "weight"):
                base = key[: -len("weight")]
                if base + "bias" in state and state[key].shape == linear.weight.shape:
                    found.append(base)
    if len(found) != 1:
        if found:
            logger.warning("%s holds %d poolers (%s); none loaded", path, len(found), found)
        return False
    base = found[0]
    with torch.no_grad():
        linear.weight.copy_(state[base + "weight"])
        linear.bias.copy_(state[base + "bias"])
    logger.info("loaded the SV pooler from %s (%s*)", path, base)
    return True


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
        #: Whether the pooler came from ``weights`` (a HuggingFace-style ``pooler.dense.*``); else random init.
        self.pooler_loaded: bool = bool(weights) and load_local_pooler(self.pooler, cast(str | Path, weights))

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


class FrozenTeacher(nn.Module):
    """A frozen distillation teacher: an RS or SV encoder that is never trained and always in eval mode.

    * RS (:class:`RSEncoder`): the global embedding (mean of the tokens), as the authors' frozen copy of the
      pretrained RS encoder.
    * SV (:class:`SVEncoder`): ``feature="pooled"`` is the Linear + tanh pooler output (the authors': the
      ImageNet-21k ViT-B/16's pooled output, as HuggingFace's ``ViTModel.pooler_output``); ``"cls"`` the final-norm
      CLS token before the pooler (this project's earlier choice).

    Args:
        encoder: The encoder, already loaded with its weights.
        feature: SV feature (``pooled`` or ``cls``); ignored for RS.
    """

    def __init__(self, encoder: RSEncoder | SVEncoder, *, feature: str = "pooled") -> None:
        super().__init__()
        if feature not in SV_DISTILL_FEATURES:
            raise ValueError(f"feature must be one of {SV_DISTILL_FEATURES}, got {feature!r}")
        self.encoder = encoder
        self.kind = "rs" if isinstance(encoder, RSEncoder) else "sv"
        self.feature = "global" if self.kind == "rs" else feature
        self.embed_dim: int = encoder.embed_dim
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stay in eval mode whatever ``mode`` says (no dropout / drop-path in the targets)."""
        del mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Teacher feature (``B x D``) of an RS chip or SV image batch."""
        if isinstance(self.encoder, RSEncoder):
            return self.encoder.forward_global(x)
        if self.feature == "pooled":
            return self.encoder.forward_pooled(x)
        return self.encoder.forward_cls(x)


def _require_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights file not found: {path} (teachers are loaded from local files only; nothing is downloaded)"
        )
    return path


def _check_complete(missing: list[str], path: Path, what: str) -> None:
    if missing:
        raise ValueError(
            f"{what} weights {path} lack {len(missing)} tensors of the encoder (e.g. {missing[:5]}); a teacher must be "
            "a complete pretrained encoder in timm naming (check the key prefix)"
        )


def build_teachers(
    config: GAIRConfig,
    rs_teacher_weights: str | Path | None,
    sv_teacher_weights: str | Path | None,
    *,
    rs_prefix: str | None = None,
    sv_prefix: str | None = None,
) -> tuple[nn.Module | None, nn.Module | None]:
    """Build the frozen distillation teachers from local weights files (never downloads).

    The RS teacher has the student's RS geometry (``rs_arch``, ``rs_img_size``, ``rs_patch_size``, ``rs_bands``); the
    SV teacher the student's SV geometry and ``config.sv_distill_feature``. Every backbone tensor must be in the file
    (a half-random teacher would be a meaningless target); with ``sv_distill_feature="pooled"`` the SV file must also
    hold the pooler (``pooler.dense.*`` as in HuggingFace's ImageNet-21k ViT-B/16, or ``pooler.0.*``).

    Args:
        config: The student's configuration.
        rs_teacher_weights: RS teacher weights (e.g. the pretrained RS encoder the student starts from), or None.
        sv_teacher_weights: SV teacher weights (the authors: an ImageNet-21k ViT-B/16), or None.
        rs_prefix: Key prefix of the RS ViT in its file (default ``config.rs_weights_prefix``).
        sv_prefix: Key prefix of the SV ViT in its file (default ``config.sv_weights_prefix``).

    Returns:
        ``(rs_teacher, sv_teacher)``, :class:`FrozenTeacher` or None for each.

    Raises:
        FileNotFoundError: A given weights file does not exist.
        ValueError: A file lacks tensors of the encoder (or the pooler for ``pooled``).
    """
    rs_teacher: nn.Module | None = None
    sv_teacher: nn.Module | None = None
    if rs_teacher_weights:
        path = _require_file(rs_teacher_weights, "RS teacher")
        rs_enc = RSEncoder(config.rs_arch, img_size=config.rs_img_size, patch_size=config.rs_patch_size,
                           in_chans=config.rs_bands)
        missing, _ = load_local_weights(rs_enc.vit, path,
                                        prefix=config.rs_weights_prefix if rs_prefix is None else rs_prefix)
        _check_complete(missing, path, "RS teacher")
        rs_teacher = FrozenTeacher(rs_enc)
    if sv_teacher_weights:
        path = _require_file(sv_teacher_weights, "SV teacher")
        sv_enc = SVEncoder(config.sv_arch, img_size=config.sv_img_size, patch_size=config.sv_patch_size)
        missing, _ = load_local_weights(sv_enc.vit, path,
                                        prefix=config.sv_weights_prefix if sv_prefix is None else sv_prefix)
        _check_complete(missing, path, "SV teacher")
        if config.sv_distill_feature == "pooled" and not load_local_pooler(sv_enc.pooler, path):
            raise ValueError(
                f"sv_distill_feature='pooled' distils towards the teacher's Linear + tanh pooler output, but {path} "
                "holds no pooler weights (pooler.dense.weight/bias as in HuggingFace ViT, or pooler.0.weight/bias); "
                "add them or use sv_distill_feature='cls'"
            )
        sv_teacher = FrozenTeacher(sv_enc, feature=config.sv_distill_feature)
    return rs_teacher, sv_teacher
