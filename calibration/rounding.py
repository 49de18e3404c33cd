"""Rounding beyond round-to-nearest for NVFP4 groups, in the same compressed-tensors format.

:func:`round_model` decides, per fused NVFP4 group, the weights on the grid, the FP8 block scales and the
shared global scale (a :class:`RoundedGroup`); :func:`calibration.emulate.quantize_groups` (``rounded=``)
packs them into the very checkpoint tensors round-to-nearest would have, so the server changes nothing.
Methods (:class:`calibration.precision.Rounding`):

* ``rtn``: amax block scales, round-to-nearest (what ``quantize_groups`` does without ``rounded``);
* ``mse``: block scales from :func:`kernels.search_nvfp4_block_scales`, importance = the input's
  per-channel second moment ``E[x²]`` from calibration, then round-to-nearest under them;
* ``gptq``: round-to-nearest scales, codes by GPTQ error feedback (:mod:`calibration.gptq`);
* ``gptq-mse``: MSE-searched scales, codes by GPTQ.

One sequential pass over the decoder blocks (as llm-compressor's sequential pipeline): the hidden states
entering block ``b`` are cached per batch; the block's forward over every batch feeds hooks on its groups'
inputs (Hessians over real, non-pad tokens); each group is rounded; the block, now computing as its tiers
serve (:func:`calibration.emulate.emulate`, undone right after), runs again to produce the inputs of block
``b + 1``. So every block is calibrated on inputs that already carry the error of the blocks before it.
Running one block reuses the sensitivity sweep's block-input cache mechanism: blocks ``0..b-1`` are
swapped for stand-ins handing over the cached hidden states (``calibration.sensitivity._resume_at``) and
the forward stops at block ``b``'s output, so masks and rotary embeddings come from the model itself.
The model's weights are the original ones again on return (the caller picks tiers later).

Fallbacks (no Hessian for them): groups outside the decoder blocks and routed MoE expert groups
(``group.expert_slots``) get unweighted MSE scales for ``mse`` / ``gptq-mse`` and round-to-nearest
scales for ``gptq``, rounded to nearest. Groups whose tier is not NVFP4 are not rounded (and are emulated
under their tier while propagating). A W4A4 group without an ``input_amax`` entry propagates as W4A16.

Memory: the cached hidden states of one block (``batches × seq × hidden`` float), one Hessian per group
of the current block, and the rounded groups (NVFP4 codes and scales, about a ninth of float32).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration import moe
from calibration.atomic import write_bytes
from calibration.emulate import emulate, linear_modules, quantize_group
from calibration.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, HessianAccumulator, gptq_nvfp4
from calibration.groups import LinearGroup, TargetSelection
from calibration.memory import release_free_memory
from calibration.observers import TokenBatch, _model_device
from calibration.precision import Rounding, Tier
from calibration.sensitivity import _resume_at, decoder_layers
from kernels import (
    DEFAULT_SCALE_CANDIDATES,
    ScaleCandidates,
    dequantize_nvfp4,
    global_scale_from_amax,
    quantize_nvfp4,
    search_nvfp4_block_scales,
)

logger = logging.getLogger(__name__)

#: ``format`` entry of a rounded-groups file's safetensors metadata.
ROUNDED_FORMAT = "fp4roll.rounded-groups"
ROUNDED_VERSION = "1"


class RoundingError(ValueError):
    """A rounding request or file that cannot be honoured."""


@dataclass(frozen=True)
class RoundedGroup:
    """One fused group's NVFP4 rounding, kept as the checkpoint keeps it (about a ninth of float32).

    ``packed``: member -> uint8 NVFP4 codes ``[out, in/2]``; ``block_scales``: member ->
    float8_e4m3fn ``[out, in/16]``; ``global_scale``: float32 ``[1]``, shared by the members (vLLM
    fuses q/k/v and gate/up into one weight with one global scale). :attr:`weights` decodes them:
    what ``quantize_group(weights=, block_scales=, global_scale=)`` packs without loss.
    """

    packed: Mapping[str, torch.Tensor]
    block_scales: Mapping[str, torch.Tensor]
    global_scale: torch.Tensor

    @classmethod
    def from_weights(
        cls,
        weights: Mapping[str, torch.Tensor],
        block_scales: Mapping[str, torch.Tensor],
        global_scale: torch.Tensor,
    ) -> RoundedGroup:
        """Pack ``weights`` (member -> ``[out, in]``, every value on the grid of its block scale);
        raises :class:`RoundingError` for a weight off that grid."""
        gs = global_scale.reshape(1).to(torch.float32).cpu()
        packed = {}
        for member, weight in weights.items():
            weight = weight.detach().to(torch.float32).cpu()
            codes = quantize_nvfp4(weight, gs, block_scale=block_scales[member], name=member)
            if not torch.equal(dequantize_nvfp4(*codes, torch.float32), weight):
                raise RoundingError(f"{member}: weight is not on the NVFP4 grid of its scales")
            packed[member] = codes.weight_packed.contiguous()
        scales = {m: s.cpu().contiguous() for m, s in block_scales.items()}
        return cls(packed=packed, block_scales=scales, global_scale=gs)

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(self.packed)

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """member -> float32 ``[out, in]``, decoded (a new tensor per call)."""
        return {
            m: dequantize_nvfp4(codes, self.block_scales[m], self.global_scale, torch.float32)
            for m, codes in self.packed.items()
        }


# ------------------------------------------------------------------------------------- one group


def _group_global_scale(weights: Mapping[str, torch.Tensor], headroom: float) -> torch.Tensor:
    amax = max(float(w.detach().abs().max()) for w in weights.values())
    return global_scale_from_amax(amax, headroom=headroom)


@torch.no_grad()
def round_group(
    weights: Mapping[str, torch.Tensor],
    method: Rounding,
    *,
    hessian: torch.Tensor | None = None,
    importance: torch.Tensor | None = None,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    scale_candidates: ScaleCandidates = DEFAULT_SCALE_CANDIDATES,
    headroom: float = 1.0,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> RoundedGroup:
    """Round one fused group's member weights (member -> ``[out, in]``, one shared input).

    ``hessian`` ``[in, in]`` is required by the GPTQ methods (without it they fall back to
    round-to-nearest codes under their scales); ``importance`` ``[in]`` (``E[x²]``) weights the MSE
    search (None: unweighted). ``headroom`` applies to the scale-searching methods only: ``rtn`` and
    ``gptq`` use round-to-nearest's global scale, so ``rtn`` equals ``quantize_group``'s default bytes.
    """
    method = Rounding(method)
    gs = _group_global_scale(weights, headroom if method.searches_scales else 1.0)
    scales: dict[str, torch.Tensor] = {}
    for member, w in weights.items():
        if method.searches_scales:
            imp = None if importance is None else importance.to(w.device)
            scales[member] = search_nvfp4_block_scales(
                w, gs, importance=imp, candidates=scale_candidates, name=member
            )
        else:
            scales[member] = quantize_nvfp4(w, gs, name=member).weight_scale
    if method.uses_gptq and hessian is not None:
        members = list(weights)
        stacked = torch.cat([weights[m].detach().to(torch.float32) for m in members])  # [Σout, in]
        stacked_scales = torch.cat([scales[m] for m in members])  # [Σout, in/16]
        q = gptq_nvfp4(
            stacked,
            hessian.to(stacked.device),
            stacked_scales,
            gs,
            damp=damp,
            act_order=act_order,
            block_size=block_size,
        )
        rows = [weights[m].shape[0] for m in members]
        rounded = dict(zip(members, (t.contiguous() for t in q.split(rows)), strict=True))
    else:
        rounded = {
            m: dequantize_nvfp4(*quantize_nvfp4(w, gs, block_scale=scales[m]), torch.float32) + 0.0
            for m, w in weights.items()
        }
    return RoundedGroup.from_weights(rounded, scales, gs)


# ------------------------------------------------------------------------------------- the pass


class _StopForward(Exception):
    """Raised by the hook on the last block a pass needs: nothing after it has to run."""


def _tier_of(group: LinearGroup, tiers: Mapping[str, Tier] | Tier) -> Tier:
    return tiers if isinstance(tiers, Tier) else Tier(tiers.get(group.name, Tier.BF16))


@contextmanager
def _input_hooks(
    modules: Mapping[str, nn.Module],
    accumulators: Mapping[str, tuple[str, HessianAccumulator | None]],
    mask: list[torch.Tensor | None],
    input_amax: dict[str, float],
) -> Iterator[None]:
    """Feed every real (non-pad) input row of each group's first member into the group's
    accumulator (None: none) and fold its ``max |x|`` into ``input_amax[group]``."""

    def hook(name: str, accumulator: HessianAccumulator | None):
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            current = mask[0]
            if current is not None and x.shape[:-1] == current.shape:
                x = x[current]  # [R, in]
            if accumulator is not None:
                accumulator.add(x)
            if x.numel():
                input_amax[name] = max(input_amax.get(name, 0.0), float(x.abs().amax()))

        return pre_hook

    handles = [
        modules[member].register_forward_pre_hook(hook(name, acc))
        for name, (member, acc) in accumulators.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run_to_block(
    model: nn.Module,
    layers: nn.ModuleList,
    index: int,
    tokens: TokenBatch,
    block_input: torch.Tensor | None,
) -> torch.Tensor:
    """Block ``index``'s output for one batch, its input handed over from ``block_input`` (None for
    block 0: the embeddings)."""
    captured: list[torch.Tensor] = []

    def stop(_module: nn.Module, _args: tuple, output) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = layers[index].register_forward_hook(stop)
    try:
        with _resume_at(model, index) as handover:
            handover.hidden = block_input
            with suppress(_StopForward):
                model(
                    input_ids=tokens.input_ids,
                    attention_mask=tokens.attention_mask,
                    use_cache=False,
                )
    finally:
        handle.remove()
    if not captured:
        raise RoundingError(f"decoder block {index} did not run")
    return captured[0].detach()


def _fallback_group(
    model: nn.Module, linears: Mapping[str, nn.Linear], group: LinearGroup
) -> Mapping[str, torch.Tensor]:
    if group.expert_slots:
        return moe.expert_weights(model, group)
    return {m: linears[m].weight for m in group.members}


@torch.no_grad()
def round_and_observe(
    model: nn.Module,
    batches: Sequence[TokenBatch],
    selection: TargetSelection,
    method: Rounding,
    *,
    damp: float = DEFAULT_DAMP,
    act_order: bool = True,
    scale_candidates: ScaleCandidates = DEFAULT_SCALE_CANDIDATES,
    headroom: float = 1.0,
    tiers: Mapping[str, Tier] | Tier = Tier.NVFP4,
    input_amax: Mapping[str, float] | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    progress: bool = False,
    observe_input_amax: bool = False,
) -> tuple[dict[str, RoundedGroup], dict[str, float]]:
    """Round every NVFP4 group of ``selection`` by ``method`` in one sequential pass (module doc);
    returns ``(rounded groups, input amax)``.

    ``batches``: calibration prompts (right-padded; pad positions never reach a Hessian). ``tiers``:
    one tier for all, or group name -> tier (a group missing from the mapping counts as BF16); only
    NVFP4 / NVFP4A16 groups are rounded and returned, keyed by group name in selection order.
    ``input_amax`` (group name -> calibrated input amax) lets W4A4 groups propagate with their input
    fake-quant. ``damp``, ``act_order``, ``block_size``: GPTQ (:func:`calibration.gptq.gptq_nvfp4`);
    ``scale_candidates``, ``headroom``: the MSE search (``kernels.ScaleCandidates``,
    ``global_scale_from_amax``). The model's parameters are unchanged on return.

    ``observe_input_amax``: every group of a decoder block (NVFP4 or not, no routed experts) records
    the ``max |x|`` of its calibration inputs as they reach it in the pass (carrying the error of the
    blocks before it, as served), and a W4A4 group propagates with that amax, so no separate
    statistics forward is needed (:func:`observes_every_input`). Otherwise the amax map is empty.
    """
    method = Rounding(method)
    linears = linear_modules(model)
    targets = [g for g in selection.groups if _tier_of(g, tiers).is_nvfp4]
    options = dict(
        damp=damp,
        act_order=act_order,
        scale_candidates=scale_candidates,
        headroom=headroom,
        block_size=block_size,
    )
    result: dict[str, RoundedGroup] = {}
    observed: dict[str, float] = {}
    fallback = [g for g in targets if g.expert_slots or g.block_index is None]
    in_blocks = [g for g in targets if g not in fallback]
    if observe_input_amax and not observes_every_input(selection, method):
        raise RoundingError(
            f"{method.value} cannot observe every group's input amax (round-to-nearest, routed "
            "experts or groups outside the decoder blocks): collect activation statistics"
        )
    if method.needs_calibration and (in_blocks or observe_input_amax):
        if not batches:
            raise RoundingError(f"{method.value} needs calibration batches")
        rounded, observed = _sequential_pass(
            model,
            batches,
            selection,
            in_blocks,
            method,
            tiers,
            input_amax,
            options,
            progress,
            observe_input_amax=observe_input_amax,
        )
        result.update(rounded)
    else:
        fallback = targets
    for group in fallback:
        result[group.name] = round_group(_fallback_group(model, linears, group), method, **options)
    order = {g.name: i for i, g in enumerate(selection.groups)}
    ordered = dict(sorted(result.items(), key=lambda item: order[item[0]]))
    return ordered, {g.name: observed[g.name] for g in selection.groups if g.name in observed}


def observes_every_input(selection: TargetSelection, method: Rounding) -> bool:
    """Whether :func:`round_and_observe` sees the input of every group of ``selection``: a
    calibrated (sequential) method and only plain Linear groups inside the decoder blocks."""
    return Rounding(method).needs_calibration and all(
        g.block_index is not None and not g.expert_slots for g in selection.groups
    )


def round_model(
    model: nn.Module,
    batches: Sequence[TokenBatch],
    selection: TargetSelection,
    method: Rounding,
    **options,
) -> dict[str, RoundedGroup]:
    """:func:`round_and_observe`'s rounded groups (same arguments, no amax observation)."""
    return round_and_observe(model, batches, selection, method, **options)[0]


def _sequential_pass(
    model: nn.Module,
    batches: Sequence[TokenBatch],
    selection: TargetSelection,
    groups: Sequence[LinearGroup],
    method: Rounding,
    tiers: Mapping[str, Tier] | Tier,
    input_amax: Mapping[str, float] | None,
    options: Mapping,
    progress: bool,
    *,
    observe_input_amax: bool = False,
) -> tuple[dict[str, RoundedGroup], dict[str, float]]:
    layers = decoder_layers(model)
    modules = dict(model.named_modules())
    linears = linear_modules(model)
    device = _model_device(model)
    batches = [b.to(device) for b in batches]
    by_block: dict[int, list[LinearGroup]] = {}
    for group in groups:
        by_block.setdefault(group.block_index, []).append(group)
    # every non-expert group of a block, for propagating the block as the plan serves it
    block_members: dict[int, list[LinearGroup]] = {}
    for group in selection.groups:
        if group.block_index is not None and not group.expert_slots:
            block_members.setdefault(group.block_index, []).append(group)
    last = max([*by_block, *(block_members if observe_input_amax else ())])
    result: dict[str, RoundedGroup] = {}
    observed: dict[str, float] = {}
    amax_in_use = observed if observe_input_amax else (input_amax or {})
    cached: list[torch.Tensor | None] = [None] * len(batches)
    masks = [b.attention_mask.bool() for b in batches]
    for index in tqdm(range(last + 1), desc=f"rounding ({method.value})", disable=not progress):
        todo = by_block.get(index, [])
        watched = block_members.get(index, []) if observe_input_amax else todo
        if watched:
            accumulators = {
                g.name: (
                    g.members[0],
                    HessianAccumulator(g.in_features, not method.uses_gptq) if g in todo else None,
                )
                for g in watched
            }
            current: list[torch.Tensor | None] = [None]
            block_amax: dict[str, float] = {}
            with _input_hooks(modules, accumulators, current, block_amax):
                for i, tokens in enumerate(batches):
                    current[0] = masks[i]
                    _run_to_block(model, layers, index, tokens, cached[i])
            if observe_input_amax:
                observed.update(block_amax)
            for group in todo:
                acc = accumulators[group.name][1]
                result[group.name] = round_group(
                    {m: linears[m].weight for m in group.members},
                    method,
                    hessian=acc.hessian if method.uses_gptq else None,
                    importance=acc.second_moment,
                    **options,
                )
                del accumulators[group.name]
        if index == last:
            break
        quantized = []
        for group in block_members.get(index, []):
            tier = _tier_of(group, tiers)
            if not tier.quantizes_weights:
                continue
            amax = amax_in_use.get(group.name)
            if tier is Tier.NVFP4 and amax is None:
                tier = Tier.NVFP4A16
            rounded = result.get(group.name) if tier.is_nvfp4 else None
            kwargs = {}
            if rounded is not None:
                kwargs = dict(
                    weights=rounded.weights,
                    block_scales=rounded.block_scales,
                    global_scale=rounded.global_scale,
                )
            quantized.append(quantize_group(linears, group, tier, input_amax=amax, **kwargs))
        with emulate(model, quantized):
            for i, tokens in enumerate(batches):
                cached[i] = _run_to_block(model, layers, index, tokens, cached[i])
        release_free_memory()
    return result, observed


# ------------------------------------------------------------------------------------- files


def save_rounded(
    path: str | os.PathLike,
    groups: Mapping[str, RoundedGroup],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``groups`` to one safetensors file, atomically (no pickle).

    Per member ``<member>.weight_packed`` (uint8 NVFP4 codes) and ``<member>.weight_scale`` (FP8); per
    group ``<group>:global_scale`` (float32 [1]); the header's metadata holds ``format``, ``version``,
    ``groups`` (JSON: group -> members) and the caller's ``metadata`` (str -> str, e.g. the method).
    Weights are stored as the group's codes.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, list[str]] = {}
    for name, rounded in groups.items():
        layout[name] = list(rounded.members)
        gs = rounded.global_scale.reshape(1).to(torch.float32)
        tensors[f"{name}:global_scale"] = gs.clone()
        for member in rounded.members:
            tensors[f"{member}.weight_packed"] = rounded.packed[member].contiguous()
            tensors[f"{member}.weight_scale"] = rounded.block_scales[member].contiguous()
    header = dict(metadata or {})
    header.update(format=ROUNDED_FORMAT, version=ROUNDED_VERSION, groups=json.dumps(layout))
    return write_bytes(path, save(tensors, metadata=header))


def rounded_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a :func:`save_rounded` file (``format``, ``version``, ``groups``, ...)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return _checked_header(path, fh.metadata())


def _checked_header(path: str | os.PathLike, metadata: Mapping[str, str] | None) -> dict[str, str]:
    header = dict(metadata or {})
    if header.get("format") != ROUNDED_FORMAT:
        raise RoundingError(f"{path}: not a rounded-groups file (format {header.get('format')!r})")
    if header.get("version") != ROUNDED_VERSION:
        raise RoundingError(f"{path}: unsupported version {header.get('version')!r}")
    return header


def load_rounded(path: str | os.PathLike) -> dict[str, RoundedGroup]:
    """Read a :func:`save_rounded` file: group name -> :class:`RoundedGroup` (the saved codes)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        header = _checked_header(path, fh.metadata())
        layout: dict[str, list[str]] = json.loads(header["groups"])
        groups: dict[str, RoundedGroup] = {}
        for name, members in layout.items():
            gs = fh.get_tensor(f"{name}:global_scale")
            packed = {m: fh.get_tensor(f"{m}.weight_packed") for m in members}
            scales = {m: fh.get_tensor(f"{m}.weight_scale") for m in members}
            groups[name] = RoundedGroup(packed=packed, block_scales=scales, global_scale=gs)
    return groups
