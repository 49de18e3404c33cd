"""Which Linear layers get quantized, and how they fuse.

vLLM fuses ``q_proj/k_proj/v_proj`` into one ``qkv_proj`` and ``gate_proj/up_proj`` into one
``gate_up_proj``; it refuses a checkpoint whose fused parts differ in scheme or global scale. So the unit of
every decision here (global scale, KL measurement, fallback) is the *fused group*, never a lone Linear.

Routed MoE experts (transformers 5 holds them as fused 3-D parameters, not Linears) are groups too:
per expert, ``gate+up`` (one global scale, one input scale, as vLLM's w13 needs) and ``down``; the
members are the per-expert checkpoint names vLLM loads (:mod:`calibration.moe`).

Ignore patterns follow compressed-tensors: ``"re:<regex>"`` is matched with :func:`re.match` against the
full module name; any other string matches a module whose full name equals it or ends with ``"." + it``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum

from torch import nn

from calibration.precision import DEFAULT_IGNORE
from kernels import FP4_BLOCK_SIZE

# Sibling projections that vLLM fuses into one weight.
_FUSED_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)
_BLOCK_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class GroupKind(str, Enum):
    ATTENTION_QKV = "attn_qkv"
    ATTENTION_OUT = "attn_o"
    MLP_GATE_UP = "mlp_gate_up"
    MLP_DOWN = "mlp_down"
    EXPERT_GATE_UP = (
        "expert_gate_up"  # one routed expert's gate+up (a slice of a fused experts module)
    )
    EXPERT_DOWN = "expert_down"
    OTHER = "other"


@dataclass(frozen=True)
class ExpertSlot:
    """Where one per-expert projection lives in the model: rows ``[start, stop)`` of
    ``<module>.<param>[expert]``, a ``[out, in]`` Linear weight (``param``: ``gate_up_proj``/``down_proj``)."""

    module: str  # model name of the fused experts module, e.g. "model.layers.0.mlp.experts"
    param: str
    expert: int
    start: int
    stop: int


@dataclass(frozen=True)
class LinearGroup:
    """One fused group: the members share a global scale and a fallback decision."""

    name: str  # e.g. "model.layers.3.self_attn.qkv" or the lone member's own name
    members: tuple[str, ...]  # full module names, in model order
    kind: GroupKind
    block_index: int | None  # decoder layer index, None outside the layer stack
    in_features: int
    num_params: int
    #: Routed experts only: where each member's weight sits in its fused experts module (member order).
    expert_slots: tuple[ExpertSlot, ...] = ()

    @property
    def tier_unit(self) -> str:
        """Groups sharing a tier unit must share a tier: vLLM serves all routed experts of one MoE layer
        (gate/up and down) with one scheme. A Linear group is its own unit."""
        return self.expert_slots[0].module if self.expert_slots else self.name


@dataclass(frozen=True)
class TargetSelection:
    """Every Linear of a model, sorted into quantizable groups and skipped layers (with reasons)."""

    groups: tuple[LinearGroup, ...]
    skipped: dict[str, str] = field(
        default_factory=dict
    )  # module name -> why it stays high precision

    def group_of(self, module_name: str) -> LinearGroup:
        for group in self.groups:
            if module_name in group.members:
                return group
        raise KeyError(f"{module_name!r} is not in any quantized group")

    @property
    def quantized_layers(self) -> tuple[str, ...]:
        return tuple(m for g in self.groups for m in g.members)


def matches_any(module_name: str, patterns: Iterable[str]) -> bool:
    """True when ``module_name`` matches one of the compressed-tensors style ignore patterns."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], module_name):
                return True
        elif module_name == pattern or module_name.endswith("." + pattern):
            return True
    return False


def _kind(leaf: str) -> GroupKind:
    if leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
        return GroupKind.ATTENTION_QKV
    if leaf in ("o_proj", "out_proj", "dense"):
        return GroupKind.ATTENTION_OUT
    if leaf in ("gate_proj", "up_proj", "gate_up_proj"):
        return GroupKind.MLP_GATE_UP
    if leaf in ("down_proj",):
        return GroupKind.MLP_DOWN
    return GroupKind.OTHER


def select_targets(model: nn.Module, ignore: Sequence[str] = DEFAULT_IGNORE) -> TargetSelection:
    """Sort every ``nn.Linear`` of ``model`` into fused groups to quantize, or skipped layers.

    A layer is skipped when it matches ``ignore`` or its ``in_features`` is not a multiple of the NVFP4
    block size (16). If any member of a fused group is skipped, the whole group is skipped, since vLLM
    needs the fused parts to agree. Routed experts of fused MoE modules join as per-expert groups in model
    order; their routers are listed as skipped (:func:`calibration.moe.expert_targets`).
    """
    from calibration.moe import expert_targets  # moe builds on this module

    linears = {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    skipped: dict[str, str] = {}
    for name, mod in linears.items():
        if matches_any(name, ignore):
            skipped[name] = "ignored by pattern"
        elif mod.in_features % FP4_BLOCK_SIZE:
            skipped[name] = f"in_features={mod.in_features} is not a multiple of {FP4_BLOCK_SIZE}"

    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups: list[tuple[int, LinearGroup]] = []
    claimed: set[str] = set()
    for name in linears:  # named_modules order is model order
        if name in claimed:
            continue
        parent, _, leaf = name.rpartition(".")
        members = (name,)
        group_name = name
        for siblings in _FUSED_SIBLINGS:
            if leaf in siblings:
                prefix = f"{parent}." if parent else ""
                present = tuple(prefix + s for s in siblings if prefix + s in linears)
                if len(present) > 1:
                    members = present
                    group_name = prefix + ("qkv" if "q_proj" in siblings else "gate_up")
                break
        claimed.update(members)
        bad = [m for m in members if m in skipped]
        if bad:
            for m in members:
                skipped.setdefault(m, f"fused with {bad[0]}, which stays high precision")
            continue
        match = _BLOCK_INDEX.search(name)
        groups.append(
            (
                order[name],
                LinearGroup(
                    name=group_name,
                    members=members,
                    kind=_kind(leaf),
                    block_index=int(match.group(1)) if match else None,
                    in_features=linears[name].in_features,
                    num_params=sum(linears[m].weight.numel() for m in members),
                ),
            )
        )
    experts, experts_skipped = expert_targets(model, ignore)
    skipped.update(experts_skipped)
    groups.extend((order[g.expert_slots[0].module], g) for g in experts)
    groups.sort(key=lambda item: item[0])  # stable: expert groups keep their expert order
    return TargetSelection(groups=tuple(g for _, g in groups), skipped=skipped)
