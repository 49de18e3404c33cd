"""One emulation of a quantized model: what every consumer runs when it asks "how would this serve?".

A fused group (``calibration.groups.LinearGroup``) gets a :class:`Tier`. Quantizing it
(:func:`quantize_group`) produces each member's checkpoint tensors under compressed-tensors' names —
the very tensors :mod:`calibration.checkpoint` writes and reads back. :func:`emulate` decodes those
tensors into the model's Linear weights and installs the activation fake-quant the tier needs, undoably;
the checkpoint loader decodes the same tensors and installs the same hooks (:func:`install_input_quantizers`).
So the KL sweep, the plan's verification, the exported checkpoint reloaded and the replay canary compute
the same numbers, bit for bit, by construction (tested). Routed MoE experts are groups too: their members
are per-expert checkpoint names whose weights are slices of fused experts parameters
(:mod:`calibration.moe` places them and fake-quantizes their inputs inside the experts forward).

Tiers (DESIGN.md, "Quality"):

* ``nvfp4`` — W4A4: NVFP4 weights (E2M1 codes, FP8 E4M3 block scales per 16 along K, one FP32 global
  scale per fused group) and NVFP4 inputs (dynamic FP8 scale per 16 values under the static
  ``input_global_scale = 448*6 / calibrated input amax``, shared by the fused members);
* ``nvfp4a16`` — W4A16: NVFP4 weights only;
* ``fp8`` — W8A8: FP8 E4M3 weights with one FP32 scale per output channel, dynamic per-token FP8 inputs
  (compressed-tensors ``float-quantized``);
* ``bf16`` — high precision: the weight as the checkpoint stores it (the export dtype).

``storage_dtype`` (bf16 by default in the export) rounds every tensor that is not quantized through the
dtype the checkpoint stores it in, so an fp32 calibration model emulates the bf16 checkpoint exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from calibration import moe
from calibration.groups import ExpertSlot, LinearGroup, TargetSelection
from calibration.memory import release_free_memory
from calibration.precision import Tier

if TYPE_CHECKING:
    from calibration.rounding import RoundedGroup
from kernels import (
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quantize_fp8_activation_per_token,
    fake_quantize_nvfp4_activation,
    global_scale_from_amax,
    quantize_fp8_per_channel,
    quantize_nvfp4,
)

#: Tensor-name suffixes of a quantized Linear, exactly as compressed-tensors writes them.
WEIGHT = "weight"
WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_GLOBAL_SCALE = "weight_global_scale"
INPUT_GLOBAL_SCALE = "input_global_scale"
#: Suffixes that only a quantized Linear carries (everything else of a checkpoint is a plain tensor).
QUANTIZED_SUFFIXES = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_GLOBAL_SCALE, INPUT_GLOBAL_SCALE)


class EmulationError(ValueError):
    """A group cannot be quantized or emulated as asked."""


@dataclass(frozen=True)
class QuantizedLinear:
    """One Linear's checkpoint tensors under a tier (names without the module prefix)."""

    name: str  # full module name
    tier: Tier
    tensors: Mapping[str, torch.Tensor] = field(repr=False)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight a server computes with, ``[out, in]`` in ``dtype``."""
        t = self.tensors
        if self.tier.is_nvfp4:
            return dequantize_nvfp4(
                t[WEIGHT_PACKED], t[WEIGHT_SCALE], t[WEIGHT_GLOBAL_SCALE], dtype=dtype
            )
        if self.tier is Tier.FP8:
            return dequantize_fp8(t[WEIGHT], t[WEIGHT_SCALE], dtype=dtype)
        return t[WEIGHT].to(dtype)

    @property
    def input_global_scale(self) -> torch.Tensor | None:
        return self.tensors.get(INPUT_GLOBAL_SCALE)


@dataclass(frozen=True)
class GroupQuantization:
    """A fused group under one tier: every member's tensors (members share the scales of the tier)."""

    group: LinearGroup
    tier: Tier
    members: tuple[QuantizedLinear, ...]

    @property
    def weight_bytes(self) -> int:
        return sum(
            sum(t.numel() * t.element_size() for t in m.tensors.values()) for m in self.members
        )


# ------------------------------------------------------------------------------------- quantize


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of ``model`` by full name, in model order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def group_weight_global_scale(
    weights: Mapping[str, torch.Tensor], group: LinearGroup
) -> torch.Tensor:
    """The shared fp32 [1] NVFP4 global scale of a fused group: ``448*6 / max over members |W|``."""
    amax = max(float(weights[m].detach().abs().max()) for m in group.members)
    return global_scale_from_amax(amax)


def input_global_scale_from_amax(group: LinearGroup, amax: float | None) -> torch.Tensor:
    """``448*6 / amax`` fp32 [1] for a W4A4 group; ``amax`` must be finite and > 0."""
    if amax is None:
        raise EmulationError(
            f"{group.name}: W4A4 (nvfp4) needs the calibrated input amax of the group; run "
            "calibration, or use nvfp4a16"
        )
    if not (amax > 0.0 and amax != float("inf")):
        raise EmulationError(f"input amax of {group.name} must be finite and > 0, got {amax}")
    return global_scale_from_amax(amax)


@torch.no_grad()
def quantize_group(
    linears: Mapping[str, nn.Linear],
    group: LinearGroup,
    tier: Tier,
    *,
    input_amax: float | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
    block_scales: Mapping[str, torch.Tensor] | None = None,
    global_scale: torch.Tensor | None = None,
) -> GroupQuantization:
    """Quantize ``group``'s members under ``tier`` into checkpoint tensors (CPU, contiguous).

    ``weights`` (member -> ``[out, in]``) replaces the modules' weights, e.g. GPTQ's result (already on
    the NVFP4 grid of ``block_scales`` / ``global_scale``); ``block_scales`` (member -> FP8 ``[out, in/16]``,
    e.g. from an MSE search) and ``global_scale`` override round-to-nearest's amax scales. W4A4 needs
    ``input_amax`` (the group's calibrated input absolute maximum).
    """
    weights = weights or {}
    source = {
        m: (weights[m] if m in weights else linears[m].weight).detach() for m in group.members
    }
    members: list[QuantizedLinear] = []
    if tier.is_nvfp4:
        gs = global_scale if global_scale is not None else group_weight_global_scale(source, group)
        gs = gs.reshape(1).to(torch.float32)
        igs = (
            input_global_scale_from_amax(group, input_amax) if tier.quantizes_activations else None
        )
        for member in group.members:
            scale = None if block_scales is None else block_scales.get(member)
            packed = quantize_nvfp4(
                source[member], gs.to(source[member].device), name=member, block_scale=scale
            )
            tensors = {
                WEIGHT_PACKED: packed.weight_packed,
                WEIGHT_SCALE: packed.weight_scale,
                # one tensor per member: safetensors refuses tensors sharing memory
                WEIGHT_GLOBAL_SCALE: packed.weight_global_scale.reshape(1).float().clone(),
            }
            if igs is not None:
                tensors[INPUT_GLOBAL_SCALE] = igs.clone()
            members.append(QuantizedLinear(member, tier, _cpu(tensors)))
    elif tier is Tier.FP8:
        for member in group.members:
            weight_fp8, scale = quantize_fp8_per_channel(source[member], name=member)
            members.append(
                QuantizedLinear(member, tier, _cpu({WEIGHT: weight_fp8, WEIGHT_SCALE: scale}))
            )
    else:
        for member in group.members:
            members.append(QuantizedLinear(member, tier, {WEIGHT: source[member]}))
    return GroupQuantization(group, tier, tuple(members))


def _cpu(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def quantize_groups(
    model: nn.Module,
    groups: Iterable[LinearGroup],
    tiers: Tier | Mapping[str, Tier],
    input_amax: Mapping[str, float] | None = None,
    rounded: Mapping[str, RoundedGroup] | None = None,
) -> tuple[GroupQuantization, ...]:
    """:func:`quantize_group` for each of ``groups``. ``tiers``: one tier for all, or group name ->
    tier; ``input_amax``: group name -> calibrated input amax (W4A4); ``rounded``: group name ->
    :class:`calibration.rounding.RoundedGroup` (MSE / GPTQ), used by the group when its tier is NVFP4
    (W4A4 or W4A16); other groups, and FP8 / BF16 tiers, get round-to-nearest of the model's weights."""
    linears = linear_modules(model)
    out = []
    for group in groups:
        tier = tiers if isinstance(tiers, Tier) else tiers[group.name]
        amax = (input_amax or {}).get(group.name) if tier is Tier.NVFP4 else None
        weights = moe.expert_weights(model, group) if group.expert_slots else None
        choice = (rounded or {}).get(group.name) if tier.is_nvfp4 else None
        if choice is None:
            out.append(quantize_group(linears, group, tier, input_amax=amax, weights=weights))
            continue
        if set(choice.members) != set(group.members):
            raise EmulationError(
                f"{group.name}: rounded members {sorted(choice.members)} are not the group's"
            )
        out.append(
            quantize_group(
                linears,
                group,
                tier,
                input_amax=amax,
                weights=choice.weights,
                block_scales=choice.block_scales,
                global_scale=choice.global_scale,
            )
        )
    return tuple(out)


# ------------------------------------------------------------------------------------- activations


def input_quantizer(
    tier: Tier, input_global_scale: torch.Tensor | None = None
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The activation fake-quant a tier applies to a Linear's input (None: inputs stay as they are)."""
    if tier is Tier.NVFP4:
        if input_global_scale is None:
            raise EmulationError("an NVFP4 W4A4 layer needs its input_global_scale")
        scale = input_global_scale.reshape(1).to(torch.float32)
        return lambda x: fake_quantize_nvfp4_activation(x, scale.to(x.device))
    if tier is Tier.FP8:
        return fake_quantize_fp8_activation_per_token
    return None


def _pre_hook(quantize: Callable[[torch.Tensor], torch.Tensor]):
    def hook(_module: nn.Module, args: tuple) -> tuple:
        return (quantize(args[0]), *args[1:])

    return hook


def install_input_quantizers(
    model: nn.Module,
    quantized: Iterable[QuantizedLinear],
    expert_slots: Mapping[str, ExpertSlot] | None = None,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Forward pre-hooks fake-quantizing the inputs of every W4A4 / W8A8 layer of ``quantized``.

    A name that is no module is a routed expert's member, found in ``expert_slots`` (default: the
    model's checkpoint layout); its input is fake-quantized inside the experts forward, once per expert
    input (gate and up read one input: they must agree on tier and scale)."""
    modules = dict(model.named_modules())
    handles = []
    experts: dict[tuple[str, int, str], tuple[QuantizedLinear, Callable]] = {}
    for layer in quantized:
        quantize = input_quantizer(layer.tier, layer.input_global_scale)
        if quantize is None:
            continue
        if layer.name in modules:
            handles.append(modules[layer.name].register_forward_pre_hook(_pre_hook(quantize)))
            continue
        slots = expert_slots if expert_slots is not None else moe.checkpoint_layout(model).slots
        if layer.name not in slots:
            raise EmulationError(
                f"{layer.name} is neither a module nor a routed expert's projection"
            )
        slot = slots[layer.name]
        first, _ = experts.setdefault((slot.module, slot.expert, slot.param), (layer, quantize))
        a, b = first.input_global_scale, layer.input_global_scale
        if first.tier is not layer.tier or (a is not None and not torch.equal(a, b)):
            raise EmulationError(f"{first.name} and {layer.name} read one input, quantized apart")
    if experts:
        quantizers = {key: quantize for key, (_, quantize) in experts.items()}
        handles.extend(moe.install_expert_input_quantizers(model, quantizers))
    return handles


# ------------------------------------------------------------------------------------- emulation


class Emulation:
    """Handle of :func:`emulate`: ``remove()`` (or leaving the ``with`` block) restores the model."""

    def __init__(self) -> None:
        # (tensor, original data as kept, original dtype)
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.dtype]] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle | _DecodeOnCall] = []
        self.layers: tuple[str, ...] = ()

    def _replace(self, tensor: torch.Tensor, data: torch.Tensor) -> None:
        """Point ``tensor`` at ``data``, keeping its original data to restore. A float32 original
        that bfloat16 holds exactly (a bf16 checkpoint computed in float32) is kept in bfloat16:
        half the memory, restored bit for bit."""
        original = tensor.data
        if original.dtype == torch.float32:
            compact = original.to(torch.bfloat16)
            if torch.equal(compact.to(torch.float32), original):
                original = compact
        self._saved.append((tensor, original, tensor.dtype))
        tensor.data = data

    @property
    def active(self) -> bool:
        return bool(self._saved or self._hooks)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for tensor, original, dtype in reversed(self._saved):
            tensor.data = original.to(dtype)
        if self._saved:
            self._saved.clear()
            release_free_memory()  # the decoded weights' pages

    def __enter__(self) -> Emulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _DecodeOnCall:
    """Forward hooks giving one Linear its decoded checkpoint weight for the call only: no decoded
    copy (nor a kept original) lives between calls. ``remove()`` also restores a weight left
    swapped by a forward that raised."""

    def __init__(self, module: nn.Module, layer: QuantizedLinear) -> None:
        self.module, self.layer = module, layer
        self._original: torch.Tensor | None = None
        self._handles = [
            module.register_forward_pre_hook(self._swap_in),
            module.register_forward_hook(self._swap_out),
        ]

    def _swap_in(self, module: nn.Module, _args: tuple) -> None:
        weight = module.weight
        self._original = weight.data
        weight.data = self.layer.dequantized_weight(weight.dtype).to(weight.device)

    def _swap_out(self, module: nn.Module, _args: tuple, _output: object) -> None:
        module.weight.data, self._original = self._original, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._original is not None:
            self.module.weight.data, self._original = self._original, None


@torch.no_grad()
def emulate(
    model: nn.Module,
    quantized: Iterable[GroupQuantization],
    *,
    storage_dtype: torch.dtype | None = None,
    decode_per_call: bool = False,
) -> Emulation:
    """Make ``model`` compute as the checkpoint of ``quantized`` serves, in place and undoably.

    Each member's weight becomes its decoded checkpoint tensors (in the model's dtype); W4A4 / W8A8
    members get their input fake-quant. With ``storage_dtype``, every other floating tensor of the state
    dict is rounded through it (what an export in that dtype stores). ``decode_per_call``: a plain
    Linear member decodes its weight at each forward call instead of once (the same bits; no decoded
    copy of the model held: for a few whole-model forwards). Not thread-safe: one model per thread.
    """
    modules = dict(model.named_modules())
    handle = Emulation()
    layers: list[QuantizedLinear] = []
    slots: dict[str, ExpertSlot] = {}  # routed experts' members -> where they sit
    try:
        for group in quantized:
            if not group.tier.quantizes_weights:
                continue  # high precision: only the storage rounding below applies
            if group.group.expert_slots:
                slots.update(zip(group.group.members, group.group.expert_slots, strict=True))
            for layer in group.members:
                if layer.name in slots:
                    layers.append(layer)
                    continue
                module = modules[layer.name]
                if decode_per_call:
                    handle._hooks.append(_DecodeOnCall(module, layer))
                else:
                    weight = module.weight
                    handle._replace(
                        weight, layer.dequantized_weight(weight.dtype).to(weight.device)
                    )
                layers.append(layer)
        decoded = [
            (slots[layer.name], layer.dequantized_weight) for layer in layers if layer.name in slots
        ]
        undo, replaced = moe.replace_expert_weights(model, decoded, storage_dtype)
        handle._hooks.extend(undo)
        if storage_dtype is not None:
            replaced |= {
                id(modules[layer.name].weight) for layer in layers if layer.name not in slots
            }
            for tensor in _unique_tensors(model):
                if id(tensor) in replaced or not tensor.is_floating_point():
                    continue
                if tensor.dtype != storage_dtype:
                    stored = tensor.data.to(storage_dtype).to(tensor.dtype)
                    if not torch.equal(stored, tensor.data):  # already exact: nothing to change
                        handle._replace(tensor, stored)
        handle._hooks.extend(install_input_quantizers(model, layers, slots))
        handle.layers = tuple(layer.name for layer in layers)
    except BaseException:
        handle.remove()
        raise
    release_free_memory()  # the replaced originals' pages
    return handle


def _unique_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and persistent buffers of the state dict, each storage once (tied weights once)."""
    seen: set[int] = set()
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def selection_groups(selection: TargetSelection, names: Sequence[str]) -> list[LinearGroup]:
    """The groups of ``selection`` named in ``names`` (in that order); unknown names are an error."""
    known = {g.name: g for g in selection.groups}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise EmulationError(f"unknown group name(s) (not targeted in this model): {unknown[:5]}")
    return [known[n] for n in names]
