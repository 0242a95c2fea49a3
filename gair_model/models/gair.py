"""The GAIR model: RS encoder + NILI, SV encoder, location encoder, and the contrastive losses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gair_model.losses import LOCATION_NEGATIVES, cosine_distillation, gair_loss
from gair_model.models.encoders import SV_DISTILL_FEATURES, FrozenTeacher, RSEncoder, SVEncoder
from gair_model.models.location import build_location_encoder
from gair_model.models.nili import build_localizer, rel_xy_to_query

#: Distillation weight of the authors (``0.2 x (1 - cosine)`` towards the frozen teachers, always on). The weight is a
#: :meth:`GAIRModel.forward` argument (``distill_weight``), so the trainer passes it; this is the ``paper`` value.
PAPER_DISTILL_WEIGHT = 0.2


@dataclass
class GAIRConfig:
    """Model configuration. The dataclass defaults are the authors' (the ``paper`` preset).

    Fields whose default is the authors' released-code value: the geometry (RS ViT-B, 96 px, patch 8, 10 bands, no
    CLS; SV ViT-B/16 at 224 px), ``embed_dim=768`` (every modality), ``localizer="nili"``,
    ``location_encoder="geoclip"`` with 256 RFF frequencies at sigmas 2^0, 2^4, 2^8, ``temperature=0.07``,
    ``location_negatives="queue"`` and ``sv_distill_feature="pooled"``. The ``base`` preset is this project's ViT-B
    variant (``embed_dim=512``, ``location_negatives="batch+queue"``, ``sv_distill_feature="cls"``); ``tiny`` is a
    CPU smoke configuration with ``base``'s loss choices.

    Options outside this config that complete the authors' recipe: distillation ``distill_weight=0.2``
    (:data:`PAPER_DISTILL_WEIGHT`, a forward argument, with teachers from
    :func:`gair_model.models.encoders.build_teachers`), the optimiser's ``wd_rule="timm"``
    (:func:`gair_model.optim.param_groups`) and the loader's ``rs_resize="bicubic"``, ``rs_jitter="three_bands"``
    (p 0.7) and ``sv_resize="full"`` (:func:`gair_model.loader.build_loader`).

    Attributes:
        embed_dim: Shared embedding dimension of the contrastive space (authors: 768).
        rs_arch: timm ViT (or ``tiny``/``small``/``base``/``large``) for RS.
        rs_img_size: RS chip size in pixels.
        rs_patch_size: RS patch size.
        rs_bands: RS input bands.
        rs_weights: Optional local weights file for the RS ViT.
        rs_weights_prefix: Key prefix of the RS ViT inside ``rs_weights``.
        sv_arch: timm ViT for SV.
        sv_img_size: SV image size.
        sv_patch_size: SV patch size.
        sv_weights: Optional local weights file for the SV ViT.
        sv_weights_prefix: Key prefix of the SV ViT inside ``sv_weights``.
        localizer: ``nili`` or a baseline (``mean``, ``centre``, ``bilinear``, ``bicubic``).
        location_encoder: ``geoclip``, ``sh`` or ``mlp``.
        loc_hidden: Hidden widths of the location encoder MLP(s); ``None`` for the encoder's default.
        loc_n_freqs: RFF frequencies per branch.
        loc_sigmas: RFF branch sigmas.
        loc_sh_degree: Spherical-harmonics degree for ``sh``.
        loc_seed: Seed of the fixed RFF frequencies.
        temperature: Fixed softmax temperature.
        drop_path_rate: Stochastic depth for both ViTs.
        location_negatives: Negatives of the SV -> location and RS -> location terms. ``"queue"`` (authors,
            MoCo style): each sample's own location against the coordinate queue only (with an empty queue it falls
            back to in-batch negatives). ``"batch+queue"`` (ours, GeoCLIP style): the batch's other locations are
            negatives too, i.e. ``B - 1`` more negatives per row, at the cost of a false negative whenever a batch
            repeats a coordinate (several SV images at one point). Neither has been measured better on GAIR.
        sv_distill_feature: SV feature distilled towards the SV teacher (when ``distill_weight > 0``). ``"pooled"``
            (authors): the Linear + tanh pooler output of student and teacher (HuggingFace ``pooler_output``).
            ``"cls"`` (ours earlier): the final-norm CLS token before the pooler, which distils the backbone directly
            and does not require the teacher file to carry a pooler (timm ImageNet-21k ViTs have none).
    """

    embed_dim: int = 768
    rs_arch: str = "base"
    rs_img_size: int = 96
    rs_patch_size: int = 8
    rs_bands: int = 10
    rs_weights: str | None = None
    rs_weights_prefix: str = ""
    sv_arch: str = "base"
    sv_img_size: int = 224
    sv_patch_size: int = 16
    sv_weights: str | None = None
    sv_weights_prefix: str = ""
    localizer: str = "nili"
    location_encoder: str = "geoclip"
    loc_hidden: list[int] | None = None
    loc_n_freqs: int = 256
    loc_sigmas: list[float] = field(default_factory=lambda: [2.0**0, 2.0**4, 2.0**8])
    loc_sh_degree: int = 10
    loc_seed: int = 0
    temperature: float = 0.07
    drop_path_rate: float = 0.0
    location_negatives: str = "queue"
    sv_distill_feature: str = "pooled"

    def __post_init__(self) -> None:
        """Check the option values."""
        if self.location_negatives not in LOCATION_NEGATIVES:
            raise ValueError(f"location_negatives must be one of {LOCATION_NEGATIVES}, got {self.location_negatives!r}")
        if self.sv_distill_feature not in SV_DISTILL_FEATURES:
            raise ValueError(
                f"sv_distill_feature must be one of {SV_DISTILL_FEATURES}, got {self.sv_distill_feature!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GAIRConfig:
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


PRESETS: dict[str, dict[str, Any]] = {
    # The authors' model: two ViT-B, RS 96 px patch 8 (12x12 grid), SV 224 px patch 16, 768-d embeddings, MoCo-style
    # location terms, distillation on the SV pooled output. (Equal to the dataclass defaults, spelled out.)
    "paper": {
        "embed_dim": 768,
        "location_negatives": "queue",
        "sv_distill_feature": "pooled",
    },
    # This project's ViT-B: the paper's geometry with a 512-d contrastive space, in-batch + queue location negatives
    # and CLS-token distillation (see GAIRConfig for what each choice trades).
    "base": {
        "embed_dim": 512,
        "location_negatives": "batch+queue",
        "sv_distill_feature": "cls",
    },
    # CPU smoke config (base's loss choices): vit_tiny, RS 64 px patch 8 (8x8 grid), SV 64 px patch 16 (4x4 grid).
    "tiny": {
        "location_negatives": "batch+queue",
        "sv_distill_feature": "cls",
        "embed_dim": 128,
        "rs_arch": "tiny",
        "rs_img_size": 64,
        "sv_arch": "tiny",
        "sv_img_size": 64,
        "loc_hidden": [256, 256, 256],
        "loc_n_freqs": 64,
    },
}


def preset(name: str, **overrides: Any) -> GAIRConfig:
    """A named configuration with field overrides.

    Args:
        name: ``paper`` (the authors' model), ``base`` (this project's ViT-B variant) or ``tiny`` (CPU smoke).
        **overrides: :class:`GAIRConfig` fields that replace the preset's.

    Returns:
        The configuration.

    Raises:
        ValueError: For an unknown preset.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return GAIRConfig(**{**PRESETS[name], **overrides})


class GAIRModel(nn.Module):
    """RS, SV and location encoders plus the RS localiser, producing embeddings and the GAIR loss.

    Args:
        config: Model configuration.
        rs_teacher: Optional frozen teacher returning ``B x D_rs`` global RS features (cosine distillation).
        sv_teacher: Optional frozen teacher returning ``B x D_sv`` SV features (cosine distillation), matching
            ``config.sv_distill_feature`` (see :class:`gair_model.models.encoders.FrozenTeacher` and
            :func:`gair_model.models.encoders.build_teachers`).

    Raises:
        ValueError: A :class:`FrozenTeacher` whose SV feature or width does not match the student.
    """

    def __init__(
        self,
        config: GAIRConfig | None = None,
        *,
        rs_teacher: nn.Module | None = None,
        sv_teacher: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.config = config = config or GAIRConfig()
        self.rs_encoder = RSEncoder(
            config.rs_arch,
            img_size=config.rs_img_size,
            patch_size=config.rs_patch_size,
            in_chans=config.rs_bands,
            weights=config.rs_weights,
            weights_prefix=config.rs_weights_prefix,
            drop_path_rate=config.drop_path_rate,
        )
        self.sv_encoder = SVEncoder(
            config.sv_arch,
            img_size=config.sv_img_size,
            patch_size=config.sv_patch_size,
            out_dim=config.embed_dim,
            weights=config.sv_weights,
            weights_prefix=config.sv_weights_prefix,
            drop_path_rate=config.drop_path_rate,
        )
        self.localizer = build_localizer(config.localizer, self.rs_encoder.embed_dim, config.embed_dim)
        self.location_encoder = build_location_encoder(
            config.location_encoder,
            config.embed_dim,
            hidden=config.loc_hidden,
            n_freqs=config.loc_n_freqs,
            sigmas=tuple(config.loc_sigmas),
            sh_degree=config.loc_sh_degree,
            seed=config.loc_seed,
        )
        # Teachers are kept outside the parameter tree (not trained, not saved, not seen by DDP).
        self._teachers: dict[str, nn.Module] = {}
        if isinstance(sv_teacher, FrozenTeacher):
            if sv_teacher.feature != config.sv_distill_feature:
                raise ValueError(f"SV teacher gives {sv_teacher.feature!r} features but the config distils "
                                 f"{config.sv_distill_feature!r}")
            if sv_teacher.embed_dim != self.sv_encoder.embed_dim:
                raise ValueError(f"SV teacher width {sv_teacher.embed_dim} != student {self.sv_encoder.embed_dim}")
        if isinstance(rs_teacher, FrozenTeacher) and rs_teacher.embed_dim != self.rs_encoder.embed_dim:
            raise ValueError(f"RS teacher width {rs_teacher.embed_dim} != student {self.rs_encoder.embed_dim}")
        for name, teacher in (("rs", rs_teacher), ("sv", sv_teacher)):
            if teacher is not None:
                teacher.eval().requires_grad_(False)
                self._teachers[name] = teacher

    def teachers_to(self, device: torch.device | str) -> None:
        """Move the frozen teachers (kept outside the module tree) to ``device``."""
        for teacher in self._teachers.values():
            teacher.to(device)

    def encode_rs(self, rs: torch.Tensor, rel_xy: torch.Tensor) -> dict[str, torch.Tensor]:
        """RS token grid, global (mean-token) embedding and localised embedding at ``rel_xy``."""
        grid = self.rs_encoder.forward_tokens(rs)
        return {
            "rs_grid": grid,
            "rs_global": RSEncoder.global_from_tokens(grid),
            "rs_local": self.localizer(grid, rel_xy_to_query(rel_xy)),
        }

    def encode_sv(self, sv: torch.Tensor) -> torch.Tensor:
        """Projected SV embedding (``B x embed_dim``)."""
        return self.sv_encoder(sv)

    def encode_location(self, lonlat: torch.Tensor) -> torch.Tensor:
        """Location embedding (``B x embed_dim``) of (lon, lat) degrees."""
        return self.location_encoder(lonlat)

    def forward(
        self,
        rs: torch.Tensor,
        sv: torch.Tensor,
        lonlat: torch.Tensor,
        rel_xy: torch.Tensor,
        *,
        queue_lonlat: torch.Tensor | None = None,
        return_loss: bool = True,
        distill_weight: float = 0.0,
        gather_with_grad: bool = False,
    ) -> dict[str, Any]:
        """Embed a batch and (optionally) compute the GAIR loss.

        Args:
            rs: ``B x C x H x W`` RS chips (normalised floats).
            sv: ``B x 3 x H x W`` SV images (normalised floats).
            lonlat: ``B x 2`` SV (lon, lat) in degrees.
            rel_xy: ``B x 2`` SV position inside the RS tile, (x, y) in [0, 1] from the top-left.
            queue_lonlat: ``K x 2`` queued coordinates used as location negatives (re-encoded here); how they are
                used follows ``config.location_negatives``.
            return_loss: Compute the loss dict.
            distill_weight: Weight of the cosine distillation to the frozen teachers (if any); the authors use 0.2
                (:data:`PAPER_DISTILL_WEIGHT`). The SV student feature is ``config.sv_distill_feature``.
            gather_with_grad: SV <-> RS terms against every rank's embeddings (see
                :func:`gair_model.losses.gair_loss`); a no-op in a single process.

        Returns:
            ``{"embeddings": {...}, "losses": {...}}``; embeddings ``sv``, ``rs_local``, ``loc`` (``B x E``),
            ``rs_global`` (``B x D_rs``); losses as :func:`gair_model.losses.gair_loss` (empty if not requested).
        """
        rs_out = self.encode_rs(rs, rel_xy)
        sv_cls = self.sv_encoder.forward_cls(sv)
        sv_pooled = self.sv_encoder.pooler(sv_cls)
        sv_emb = self.sv_encoder.proj(sv_pooled)  # == self.sv_encoder.head(sv_cls)
        b = lonlat.shape[0]
        all_coords = lonlat if queue_lonlat is None else torch.cat([lonlat.to(queue_lonlat.dtype), queue_lonlat])
        loc_all = self.encode_location(all_coords)
        loc, loc_queue = loc_all[:b], loc_all[b:]
        emb = {"sv": sv_emb, "rs_local": rs_out["rs_local"], "loc": loc, "rs_global": rs_out["rs_global"]}
        losses: dict[str, torch.Tensor] = {}
        if return_loss:
            losses = gair_loss(sv_emb, rs_out["rs_local"], loc, loc_queue, temperature=self.config.temperature,
                               location_negatives=self.config.location_negatives, gather_with_grad=gather_with_grad)
            if distill_weight > 0 and self._teachers:
                distill = torch.zeros((), device=rs.device)
                if "rs" in self._teachers:
                    with torch.no_grad():
                        target = self._teachers["rs"](rs)
                    distill = distill + cosine_distillation(rs_out["rs_global"], target)
                if "sv" in self._teachers:
                    with torch.no_grad():
                        target = self._teachers["sv"](sv)
                    student = sv_pooled if self.config.sv_distill_feature == "pooled" else sv_cls
                    distill = distill + cosine_distillation(student, target)
                losses["distill"] = distill
                losses["loss"] = losses["loss"] + distill_weight * distill
        return {"embeddings": emb, "losses": losses}
