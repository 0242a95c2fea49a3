"""Optimiser and learning-rate schedule (AdamW (0.9, 0.95), wd 0.05, warm-up + cosine).

Two weight-decay rules (:data:`WD_RULES`):

* ``"timm"``: the authors' choice (timm's ``param_groups_weight_decay`` with no ``no_weight_decay_list``): no decay
  only for tensors with ``ndim <= 1`` (norm weights, biases) and names ending in ``.bias``; position embeddings and
  the CLS token (3-d tensors) *are* decayed.
* ``"exempt_embeddings"``: this project's choice: additionally exempt ``pos_embed``, ``cls_token`` and the other
  learned tokens (:data:`NO_DECAY_KEYWORDS`), as MAE / BEiT / DeiT do (timm models list them in
  ``no_weight_decay()``): decaying them pulls learned positions and the CLS token towards 0 with no regularising
  benefit. Not measured on GAIR; the ``paper`` configuration uses ``"timm"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

#: Parameter-name fragments that never get weight decay (besides every 0-d/1-d tensor: norms and biases).
NO_DECAY_KEYWORDS: tuple[str, ...] = ("pos_embed", "cls_token", "reg_token", "mask_token", "dist_token")

#: Weight-decay rules of :func:`param_groups`.
WD_RULES: tuple[str, ...] = ("timm", "exempt_embeddings")


def scaled_lr(blr: float, effective_batch: int) -> float:
    """Linear scaling rule: ``lr = blr * effective_batch / 256``.

    With the paper's ``blr = 1.5e-6`` and ``256 x 96`` accumulation steps this gives ``1.44e-4``.
    """
    return blr * effective_batch / 256.0


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.05,
    rule: str = "exempt_embeddings",
    *,
    no_decay_keywords: Iterable[str] = NO_DECAY_KEYWORDS,
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Both rules never decay a parameter with ``ndim <= 1`` (norm weights, biases) or a name ending in ``.bias``.
    ``"exempt_embeddings"`` also exempts names containing any of ``no_decay_keywords`` (position embeddings, CLS
    tokens); ``"timm"`` (the authors') decays them.

    Args:
        model: The model (a DDP wrapper is fine).
        weight_decay: Weight decay of the decayed group.
        rule: ``"timm"`` or ``"exempt_embeddings"`` (see :data:`WD_RULES`).
        no_decay_keywords: Name fragments excluded from decay under ``"exempt_embeddings"``.

    Returns:
        Two parameter groups for ``torch.optim.AdamW`` (decayed first); each has a ``names`` list.

    Raises:
        ValueError: For an unknown ``rule``.
    """
    if rule not in WD_RULES:
        raise ValueError(f"weight-decay rule must be one of {WD_RULES}, got {rule!r}")
    keywords = tuple(no_decay_keywords) if rule == "exempt_embeddings" else ()
    decay, no_decay, decay_names, no_decay_names = [], [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords):
            no_decay.append(param)
            no_decay_names.append(name)
        else:
            decay.append(param)
            decay_names.append(name)
    return [
        {"params": decay, "weight_decay": weight_decay, "names": decay_names},
        {"params": no_decay, "weight_decay": 0.0, "names": no_decay_names},
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    *,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    fused: bool | None = None,
    wd_rule: str = "exempt_embeddings",
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (the ``names`` are kept in the groups for inspection).

    Args:
        model: The model.
        lr: Learning rate.
        weight_decay: Weight decay of the decayed group.
        betas: Adam betas.
        eps: Adam epsilon.
        fused: Use the fused CUDA implementation (``None``: torch's default).
        wd_rule: ``"timm"`` (the authors') or ``"exempt_embeddings"`` (ours), see :func:`param_groups`.

    Returns:
        The optimiser.
    """
    groups = param_groups(model, weight_decay, wd_rule)
    kwargs = {"fused": fused} if fused is not None else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier: linear warm-up from ``1/warmup`` to 1, then cosine decay to ``min_ratio``.

    Args:
        step: Optimiser step (0-based: the multiplier used for the ``step + 1``-th update).
        warmup_steps: Warm-up length.
        total_steps: Total optimiser steps.
        min_ratio: Final multiplier.

    Returns:
        Multiplier in ``[min_ratio, 1]``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` applying :func:`warmup_cosine` (step it once per optimiser step)."""

    def fn(step: int) -> float:
        return warmup_cosine(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
