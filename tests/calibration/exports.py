"""Test helper: export a whole model under one tier (the pack path, with BF16 fallbacks by name)."""

from __future__ import annotations

import torch

from calibration.checkpoint import export_checkpoint
from calibration.emulate import quantize_groups
from calibration.groups import DEFAULT_IGNORE, select_targets
from calibration.precision import Tier


def export_all(
    model,
    out_dir,
    tier: Tier = Tier.NVFP4A16,
    *,
    input_amax=None,
    ignore=DEFAULT_IGNORE,
    fallback=(),
    dtype=torch.bfloat16,
    **kwargs,
):
    """Every targeted group (minus ``fallback`` group names, kept BF16) under ``tier``, exported."""
    selection = select_targets(model, ignore)
    tiers = {g.name: Tier.BF16 if g.name in fallback else tier for g in selection.groups}
    groups = quantize_groups(model, selection.groups, tiers, input_amax)
    return export_checkpoint(
        model, out_dir, groups, skipped=selection.skipped, dtype=dtype, **kwargs
    )
