"""Routed MoE experts: targets, per-expert calibration inputs, emulation and the checkpoint layout.

transformers 5 holds the routed experts of Mixtral / Qwen2-MoE / Qwen3-MoE (and of the families that
share their conversion: OLMoE, DeepSeek-V2/V3, ...) as one fused module per layer with 3-D parameters
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` (``MixtralExperts``, ``Qwen2MoeExperts``),
and converts them from/to the per-expert checkpoint layout on load/save (``conversion_mapping.py``):
Mixtral ``block_sparse_moe.experts.<e>.w1|w3|w2``, Qwen ``mlp.experts.<e>.gate_proj|up_proj|down_proj``.
vLLM loads exactly that per-expert layout (``FusedMoE.make_expert_params_mapping``) and serves all routed
experts of one MoE layer with one compressed-tensors scheme
(``compressed_tensors_moe.py: CompressedTensorsMoEMethod.get_moe_method``).

* **Layout** (:func:`checkpoint_layout`): per-expert checkpoint names and where each sits in the fused
  parameters, found by running transformers' own ``revert_weight_conversion`` (what ``save_pretrained``
  runs) on index probes, never from hard-coded names.
* **Targets** (:func:`expert_targets`): per expert a ``gate_up`` group (gate + up: one weight global
  scale and one input global scale; vLLM keeps ``w13_weight_global_scale[:, 0]`` and warns when the two
  differ) and a ``down`` group. The groups of one MoE layer share a tier unit. Routers never are targets.
* **Per-expert inputs**: the fused forward hides each expert's input from module hooks, so
  :func:`register_expert_input_hook` swaps in a forward that loops over the experts (transformers' eager
  implementation, with a hook before each projection) for as long as a hook is registered. Calibration
  observes through it (:class:`ExpertInputObserver`); W4A4 / W8A8 emulation fake-quantizes through it.
* **Statistics** (:func:`resolve_expert_input_amax`): an expert that saw no calibration token (or only
  zeros) never gets a zero or infinite input scale: gate/up falls back to the MoE block's input amax (the
  hidden states every expert's gate/up reads), down to the max over the layer's experts that saw tokens;
  each fallback is recorded (:class:`ExpertInputStats`).
* **Preset** (:func:`experts_only_preset`): routed experts at the base tier, the rest left to the plan.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import types
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calibration.groups import (
    _BLOCK_INDEX,
    ExpertSlot,
    GroupKind,
    LinearGroup,
    TargetSelection,
    matches_any,
)
from calibration.precision import ExpertInputScale, Tier
from kernels import FP4_BLOCK_SIZE

GATE_UP = "gate_up_proj"  # fused parameter names, also the projections a hook is called for
DOWN = "down_proj"
_KIND = {GATE_UP: GroupKind.EXPERT_GATE_UP, DOWN: GroupKind.EXPERT_DOWN}
#: The names vLLM looks a FusedMoE layer's scheme up by (``<prefix>.0.gate_proj`` ...), whatever the
#: checkpoint calls the projections (Mixtral: w1/w3/w2).
_VLLM_LOOKUP_LEAVES = ("gate_proj", "up_proj", "down_proj")
_WEIGHT = ".weight"


class MoeLayoutError(ValueError):
    """A fused experts module or a checkpoint does not fit the layout fp4roll writes and reads."""


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class MoeLayer:
    """One fused experts module: its per-expert projections under their checkpoint names."""

    experts: str  # model name of the fused experts module, e.g. "model.layers.0.mlp.experts"
    num_experts: int
    slots: Mapping[
        str, ExpertSlot
    ]  # checkpoint module name -> slot, by expert, gate_up before down
    routers: tuple[str, ...]  # checkpoint names of the routers beside it (never quantized)

    def members(self) -> dict[tuple[int, str], tuple[str, ...]]:
        """``(expert, param)`` -> its checkpoint names in row order (gate before up)."""
        out: dict[tuple[int, str], list[tuple[int, str]]] = {}
        for member, slot in self.slots.items():
            out.setdefault((slot.expert, slot.param), []).append((slot.start, member))
        return {key: tuple(m for _, m in sorted(found)) for key, found in out.items()}


@dataclass(frozen=True)
class CheckpointLayout:
    """How a model's state dict maps to the checkpoint transformers would save (and vLLM reads)."""

    names: Mapping[str, str]  # model state-dict key -> checkpoint key, for every one-to-one tensor
    moe_layers: tuple[MoeLayer, ...]
    unsupported: Mapping[str, str]  # fused experts module -> why it stays high precision and fused

    @property
    def slots(self) -> dict[str, ExpertSlot]:
        return {m: s for layer in self.moe_layers for m, s in layer.slots.items()}

    def slots_by_param(self) -> dict[str, list[tuple[str, ExpertSlot]]]:
        """``"<experts module>.<param>"`` (a state-dict key) -> its per-expert (member, slot) pieces."""
        out: dict[str, list[tuple[str, ExpertSlot]]] = {}
        for member, slot in self.slots.items():
            out.setdefault(f"{slot.module}.{slot.param}", []).append((member, slot))
        return out


def _fused_params(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter] | None:
    params = dict(module.named_parameters(recurse=False))
    gate_up, down = params.get(GATE_UP), params.get(DOWN)
    if gate_up is None or down is None or gate_up.dim() != 3 or down.dim() != 3:
        return None
    return gate_up, down


def _unsupported(module: nn.Module, gate_up: torch.Tensor, down: torch.Tensor) -> str | None:
    """Why fp4roll cannot treat ``module`` as ``E`` SwiGLU experts ``[E, 2I, H]`` / ``[E, H, I]``."""
    extra = sorted(set(dict(module.named_parameters(recurse=False))) - {GATE_UP, DOWN})
    if extra:
        return f"extra parameters {extra}"
    flags = {
        "has_bias": False,
        "is_transposed": False,
        "is_concatenated": True,
        "has_gate": True,
        "has_post_expert_norm": False,
    }
    odd = [f for f, want in flags.items() if getattr(module, f, want) != want]
    if odd:
        return f"layout flags {odd}"
    experts, rows, hidden = gate_up.shape
    if down.shape[0] != experts or down.shape[1] != hidden or rows != 2 * down.shape[2]:
        return f"shapes {tuple(gate_up.shape)} / {tuple(down.shape)} are not [E, 2I, H] / [E, H, I]"
    return None


def _revert(model: nn.Module, probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' save-time conversion (model keys -> checkpoint keys) applied to ``probes``."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, probes)


#: Probe values per ``revert_weight_conversion`` call (float64: 32 MB); each call costs ~0.1 s of setup.
_PROBE_BATCH = 1 << 22


def _probe_experts(
    model: nn.Module, fused: Mapping[str, tuple[int, int, int]]
) -> dict[str, dict[str, ExpertSlot] | str]:
    """Per-expert checkpoint names of fused experts modules (name -> ``(experts, gate_up rows, down
    rows)``): probe every fused parameter with its flat row index (``[E, R, 1]``), revert, and read back
    which rows each output tensor holds. Per module: member -> slot in expert order, or why
    transformers does not save it per expert."""
    regions: list[tuple[int, str, str, int]] = []  # (first value, module, param, rows), ascending
    batches: list[dict[str, torch.Tensor]] = [{}]
    total = 0
    for name, (experts, rows_gu, rows_down) in fused.items():
        if batches[-1] and total + experts * (rows_gu + rows_down) > _PROBE_BATCH * len(batches):
            batches.append({})
        for param, rows in ((GATE_UP, rows_gu), (DOWN, rows_down)):
            values = total + torch.arange(experts * rows, dtype=torch.float64)
            batches[-1][f"{name}.{param}"] = values.view(experts, rows, 1)
            regions.append((total, name, param, rows))
            total += experts * rows
    firsts = [r[0] for r in regions]
    base_of = {name: first for first, name, _, _ in reversed(regions)}
    pieces: dict[str, list[tuple[int, torch.Tensor, str, ExpertSlot]]] = {n: [] for n in fused}
    failed: dict[str, str] = {}
    for batch in batches:
        for key, probe in _revert(model, batch).items():
            values = probe.reshape(-1)
            first = int(values[0].item())
            base, name, param, rows = regions[bisect.bisect_right(firsts, first) - 1]
            if not key.endswith(_WEIGHT) or probe.dim() != 2 or probe.shape[1] != 1:
                failed.setdefault(name, f"transformers saves {key!r} {tuple(probe.shape)}")
                continue
            expert, start = divmod(first - base, rows)
            slot = ExpertSlot(name, param, expert, start, start + values.numel())
            pieces[name].append((first, values, key[: -len(_WEIGHT)], slot))
    out: dict[str, dict[str, ExpertSlot] | str] = {}
    for name, (experts, rows_gu, rows_down) in fused.items():
        items = sorted(pieces[name], key=lambda item: item[0])
        # every output one run of consecutive rows within one expert, together each row once
        expected = base_of[name] + torch.arange(
            experts * (rows_gu + rows_down), dtype=torch.float64
        )
        tiled = bool(items) and torch.equal(torch.cat([i[1] for i in items]), expected)
        inside = all(s.stop <= (rows_gu if s.param == GATE_UP else rows_down) for *_, s in items)
        if name in failed or not (tiled and inside):
            out[name] = failed.get(name, "transformers' conversion does not split it per expert")
            continue
        ordered = sorted(items, key=lambda i: (i[3].expert, i[3].param != GATE_UP, i[3].start))
        out[name] = {member: slot for _, _, member, slot in ordered}
    return out


def _router_names(
    model: nn.Module, experts_name: str, num_experts: int, hidden: int, names: Mapping[str, str]
) -> tuple[str, ...]:
    """Siblings of the experts module with an ``[E, H]`` weight: the routers (checkpoint names)."""
    block_name = experts_name.rpartition(".")[0]
    block = model.get_submodule(block_name) if block_name else model
    out = []
    for child_name, child in block.named_children():
        weight = getattr(child, "weight", None)
        full = f"{block_name}.{child_name}" if block_name else child_name
        if full == experts_name or not isinstance(weight, torch.Tensor):
            continue
        if tuple(weight.shape) == (num_experts, hidden):
            key = f"{full}{_WEIGHT}"
            out.append(names.get(key, key)[: -len(_WEIGHT)])
    return tuple(out)


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, CheckpointLayout] = weakref.WeakKeyDictionary()


def checkpoint_layout(model: nn.Module) -> CheckpointLayout:
    """The model's checkpoint layout (cached per model object; the module structure must not change).

    One-to-one tensors are renamed as transformers saves them (e.g. Mixtral's ``mlp.gate`` is
    ``block_sparse_moe.gate`` on disk); a tensor that a conversion merges with others keeps its model
    name. Every ``nn.Linear`` must keep its name (fp4roll names quantized Linears by module name)."""
    cached = _LAYOUTS.get(model)
    if cached is not None:
        return cached
    fused: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for name, module in model.named_modules():
        params = _fused_params(module)
        if params is not None:
            fused[name] = params
    fused_keys = {f"{name}.{p}" for name in fused for p in (GATE_UP, DOWN)}
    keys = [k for k in model.state_dict(keep_vars=True) if k not in fused_keys]
    probes = {k: torch.tensor([float(i)], dtype=torch.float64) for i, k in enumerate(keys)}
    names: dict[str, str] = {}
    for new_key, probe in _revert(model, probes).items() if probes else ():
        if probe.numel() == 1:
            names[keys[int(probe.reshape(-1)[0])]] = new_key
    for key in keys:
        names.setdefault(key, key)
    renamed = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and names.get(f"{n}{_WEIGHT}", f"{n}{_WEIGHT}") != f"{n}{_WEIGHT}"
    ]
    if renamed:
        raise MoeLayoutError(
            f"transformers renames Linear layers on save ({renamed[:3]}); unsupported"
        )

    unsupported: dict[str, str] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for name, (gate_up, down) in fused.items():
        why = _unsupported(model.get_submodule(name), gate_up, down)
        if why is None:
            shapes[name] = (gate_up.shape[0], gate_up.shape[1], down.shape[1])
        else:
            unsupported[name] = why
    layers: list[MoeLayer] = []
    for name, slots in _probe_experts(model, shapes).items() if shapes else ():
        if isinstance(slots, str):
            unsupported[name] = slots
            continue
        gate_up = fused[name][0]
        routers = _router_names(model, name, gate_up.shape[0], gate_up.shape[2], names)
        layers.append(MoeLayer(name, gate_up.shape[0], slots, routers))
    layout = CheckpointLayout(names, tuple(layers), unsupported)
    _LAYOUTS[model] = layout
    return layout


def to_checkpoint_state(
    model: nn.Module, state: Mapping[str, torch.Tensor], quantized_members: Collection[str]
) -> dict[str, torch.Tensor]:
    """Model state-dict tensors under the checkpoint keys ``save_pretrained`` would write: renamed one
    to one, fused expert parameters split into per-expert ``<member>.weight`` slices. A fused parameter
    whose every member is in ``quantized_members`` is left out (their quantized tensors replace it); a
    partly quantized one is an error (vLLM serves all experts of a MoE layer with one scheme)."""
    layout = checkpoint_layout(model)
    pieces = layout.slots_by_param()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        members = pieces.get(key)
        if members is None:
            out[layout.names.get(key, key)] = tensor
            continue
        quantized = [m for m, _ in members if m in quantized_members]
        if quantized and len(quantized) != len(members):
            raise MoeLayoutError(
                f"{key}: {len(quantized)} of {len(members)} expert projections quantized; vLLM "
                "serves every routed expert of a MoE layer with one scheme"
            )
        if not quantized:
            for member, slot in members:
                out[f"{member}{_WEIGHT}"] = tensor[slot.expert, slot.start : slot.stop]
    return out


def to_model_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_checkpoint_state`: checkpoint keys -> model keys, per-expert
    ``<member>.weight`` tensors (stored or decoded) stacked back into their fused parameters."""
    layout = checkpoint_layout(model)
    model_key = {disk: key for key, disk in layout.names.items()}
    slots = layout.slots
    pieces: dict[str, list[tuple[ExpertSlot, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        slot = slots.get(key[: -len(_WEIGHT)]) if key.endswith(_WEIGHT) else None
        if slot is None:
            out[model_key.get(key, key)] = tensor
        else:
            pieces.setdefault(f"{slot.module}.{slot.param}", []).append((slot, tensor))
    expected = {k: len(v) for k, v in layout.slots_by_param().items()}
    for key, items in pieces.items():
        if len(items) != expected[key]:
            raise MoeLayoutError(f"{key}: {expected[key] - len(items)} per-expert tensors missing")
        shape = model.get_parameter(key).shape
        full = torch.empty(shape, dtype=items[0][1].dtype, device=items[0][1].device)
        for slot, tensor in items:
            full[slot.expert, slot.start : slot.stop] = tensor
        out[key] = full
    return out


def expert_config_entries(members: Iterable[str]) -> list[str]:
    """compressed-tensors ``targets`` / ``ignore`` entries for routed expert members: one regex per MoE
    layer, matching its checkpoint names and the names vLLM looks a FusedMoE layer up by
    (``<prefix>.<e>.gate_proj|up_proj|down_proj``, also for Mixtral whose files say w1/w3/w2)."""
    leaves: dict[str, set[str]] = {}
    for member in members:
        match = re.fullmatch(r"(.+)\.(\d+)\.([^.]+)", member)
        if match is None:
            raise MoeLayoutError(f"unexpected per-expert checkpoint name {member!r}")
        leaves.setdefault(match.group(1), set()).add(match.group(3))
    return [
        "re:^"
        + re.escape(prefix)
        + r"\.\d+\.(?:"
        + "|".join(sorted(names | set(_VLLM_LOOKUP_LEAVES)))
        + ")$"
        for prefix, names in sorted(leaves.items())
    ]


# ------------------------------------------------------------------------------------------ targets


def expert_targets(
    model: nn.Module, ignore: Iterable[str]
) -> tuple[list[LinearGroup], dict[str, str]]:
    """Per-expert groups of every supported fused experts module, and what stays high precision.

    A MoE layer is quantized whole or not at all (vLLM: one scheme per layer): if an ignore pattern
    matches the experts module or one member, or ``H`` / ``I`` is not a multiple of 16, all its members
    are skipped. Routers are listed as skipped (never quantized); unsupported fused modules too."""
    ignore = tuple(ignore)
    layout = checkpoint_layout(model)
    groups: list[LinearGroup] = []
    skipped: dict[str, str] = {}
    for layer in layout.moe_layers:
        skipped.update(dict.fromkeys(layer.routers, "MoE router: never quantized"))
        down = model.get_submodule(layer.experts).get_parameter(DOWN)
        hidden, inter = down.shape[1], down.shape[2]
        matched = [m for m in (layer.experts, *layer.slots) if matches_any(m, ignore)]
        if hidden % FP4_BLOCK_SIZE or inter % FP4_BLOCK_SIZE:
            why = f"hidden={hidden} / intermediate={inter}: not multiples of {FP4_BLOCK_SIZE}"
            skipped.update(dict.fromkeys(layer.slots, why))
            continue
        if matched:
            for member in layer.slots:
                skipped[member] = (
                    "ignored by pattern"
                    if member in matched
                    else f"MoE layer stays high precision with {matched[0]} (one scheme per layer)"
                )
            continue
        block = _BLOCK_INDEX.search(layer.experts)
        by_projection = layer.members()
        for expert in range(layer.num_experts):
            for param in (GATE_UP, DOWN):
                members = by_projection[(expert, param)]
                slots = tuple(layer.slots[m] for m in members)
                parents = {m.rpartition(".")[0] for m in members}
                if len(parents) != 1:
                    raise MoeLayoutError(f"{layer.experts} expert {expert}: members {members}")
                in_features = hidden if param == GATE_UP else inter
                groups.append(
                    LinearGroup(
                        name=f"{parents.pop()}.gate_up" if len(members) > 1 else members[0],
                        members=members,
                        kind=_KIND[param],
                        block_index=int(block.group(1)) if block else None,
                        in_features=in_features,
                        num_params=sum((s.stop - s.start) * in_features for s in slots),
                        expert_slots=slots,
                    )
                )
    for name, why in layout.unsupported.items():
        skipped[name] = f"fused experts stay high precision: {why}"
    return groups, skipped


def expert_weight(model: nn.Module, slot: ExpertSlot) -> torch.Tensor:
    """The ``[out, in]`` weight of one per-expert projection (a view into the fused parameter)."""
    param = model.get_submodule(slot.module).get_parameter(slot.param)
    return param[slot.expert, slot.start : slot.stop]


def expert_weights(model: nn.Module, group: LinearGroup) -> dict[str, torch.Tensor]:
    """Member -> weight view of an expert group (``quantize_group``'s ``weights``)."""
    return {
        m: expert_weight(model, s) for m, s in zip(group.members, group.expert_slots, strict=True)
    }


def check_expert_tiers(assignments: Iterable[tuple[LinearGroup, Tier]]) -> None:
    """Refuse expert groups of one MoE layer under different tiers (vLLM: one scheme per layer)."""
    seen: dict[str, tuple[Tier, str]] = {}
    for group, tier in assignments:
        if not group.expert_slots:
            continue
        first = seen.setdefault(group.tier_unit, (tier, group.name))
        if first[0] is not tier:
            raise MoeLayoutError(
                f"{group.name} is {tier.value} but {first[1]} is {first[0].value}: vLLM serves every "
                f"routed expert of {group.tier_unit} (gate/up and down) with one scheme"
            )


# ------------------------------------------------------------------------------------------ forward

#: ``hook(expert, projection, x, token_idx) -> x or None``: ``x`` ``[n, in]`` is what the projection
#: (``GATE_UP`` or ``DOWN``) of ``expert`` is about to read, ``token_idx`` ``[n]`` the flat token rows.
ExpertInputHook = Callable[[int, str, torch.Tensor, torch.Tensor], torch.Tensor | None]
_HOOKS_ATTR = "_fp4roll_expert_input_hooks"
_hook_ids = itertools.count()


def _looped_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts forward (``MixtralExperts.forward``), with the input hooks."""
    hooks = tuple(getattr(self, _HOOKS_ATTR).values())
    num_experts = self.gate_up_proj.shape[0]
    final = torch.zeros_like(hidden_states)
    with torch.no_grad():
        mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for row in hit:
        expert = int(row[0])
        if expert == num_experts:  # expert-parallel sentinel: not on this rank
            continue
        top_k_pos, token_idx = torch.where(mask[expert])
        x = _run_hooks(hooks, expert, GATE_UP, hidden_states[token_idx], token_idx)
        gate_up = F.linear(x, self.gate_up_proj[expert])
        if hasattr(self, "_apply_gate"):
            h = self._apply_gate(gate_up)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = self.act_fn(gate) * up
        h = _run_hooks(hooks, expert, DOWN, h, token_idx)
        out = F.linear(h, self.down_proj[expert]) * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def _run_hooks(hooks, expert: int, projection: str, x: torch.Tensor, token_idx: torch.Tensor):
    for hook in hooks:
        result = hook(expert, projection, x, token_idx)
        if result is not None:
            x = result
    return x


class ExpertHookHandle:
    """Removes one expert input hook; the module's own forward returns with the last one."""

    def __init__(self, module: nn.Module, key: int) -> None:
        self.module, self.key = module, key

    def remove(self) -> None:
        hooks = self.module.__dict__.get(_HOOKS_ATTR)
        if hooks is None or self.key not in hooks:
            return
        del hooks[self.key]
        if not hooks:
            del self.module.__dict__[_HOOKS_ATTR]
            del self.module.__dict__["forward"]


def register_expert_input_hook(experts: nn.Module, hook: ExpertInputHook) -> ExpertHookHandle:
    """Call ``hook`` before each expert projection of a fused experts module. While any hook is
    registered the module runs the per-expert loop (whatever ``experts_implementation`` says)."""
    hooks = experts.__dict__.get(_HOOKS_ATTR)
    if hooks is None:
        hooks = experts.__dict__[_HOOKS_ATTR] = {}
        experts.__dict__["forward"] = types.MethodType(_looped_forward, experts)
    key = next(_hook_ids)
    hooks[key] = hook
    return ExpertHookHandle(experts, key)


def install_expert_input_quantizers(
    model: nn.Module,
    quantizers: Mapping[tuple[str, int, str], Callable[[torch.Tensor], torch.Tensor]],
) -> list[ExpertHookHandle]:
    """``(experts module, expert, projection) -> fake-quant`` applied to that expert's input."""
    by_module: dict[str, dict[tuple[int, str], Callable]] = {}
    for (module, expert, projection), quantize in quantizers.items():
        by_module.setdefault(module, {})[(expert, projection)] = quantize

    def hook_for(table: dict[tuple[int, str], Callable]) -> ExpertInputHook:
        def hook(expert: int, projection: str, x: torch.Tensor, _token_idx: torch.Tensor):
            quantize = table.get((expert, projection))
            return None if quantize is None else quantize(x)

        return hook

    return [
        register_expert_input_hook(model.get_submodule(module), hook_for(table))
        for module, table in by_module.items()
    ]


class _Restore:
    """Undo of :func:`replace_expert_weights` for one fused parameter (``remove()``, like a hook)."""

    def __init__(self, param: torch.Tensor, original: torch.Tensor | None, views=()) -> None:
        self.param, self.original, self.views = param, original, list(views)

    def remove(self) -> None:
        for view, saved in self.views:  # in place: copy the overwritten slices back
            view.copy_(saved)
        self.views.clear()
        if self.original is not None:  # rebound: give the parameter its tensor back
            self.param.data = self.original
            self.original = None


@torch.no_grad()
def replace_expert_weights(
    model: nn.Module,
    decoded: Iterable[tuple[ExpertSlot, Callable[[torch.dtype], torch.Tensor]]],
    storage_dtype: torch.dtype | None = None,
) -> tuple[list[_Restore], set[int]]:
    """Write decoded per-expert weights (``decode(dtype) -> [out, in]``) into their fused parameters.

    With a ``storage_dtype`` other than the parameter's, the parameter becomes a new tensor whose other
    slices are rounded through it (the checkpoint stores them that way); otherwise the slices are
    overwritten in place (the originals are kept to copy back). Returns the undo handles and the ids of
    the parameters taken care of (the caller's storage rounding must skip them)."""
    by_param: dict[tuple[str, str], list] = {}
    for slot, decode in decoded:
        by_param.setdefault((slot.module, slot.param), []).append((slot, decode))
    undo: list[_Restore] = []
    ids: set[int] = set()
    for (module, name), items in by_param.items():
        param = model.get_submodule(module).get_parameter(name)
        data = param.data
        if storage_dtype is not None and storage_dtype != data.dtype:
            new = data.to(storage_dtype).to(data.dtype)
            for slot, decode in items:
                new[slot.expert, slot.start : slot.stop] = decode(data.dtype).to(data.device)
            undo.append(_Restore(param, data))
            param.data = new
        else:
            views = []
            for slot, decode in items:
                view = data[slot.expert, slot.start : slot.stop]
                views.append((view, view.clone()))
                view.copy_(decode(data.dtype).to(data.device))
            undo.append(_Restore(param, None, views))
        ids.add(id(param))
    return undo, ids


# ------------------------------------------------------------------------------------------ statistics


class ExpertInputObserver:
    """While installed: per fused experts module, ``max |x|`` of the MoE block input and of every
    expert's gate/up and down inputs, and the tokens routed to each expert, over real tokens only.

    Set ``token_mask`` (bool ``[batch, seq]``) before each batch; pad positions never count."""

    def __init__(self, model: nn.Module, modules: Iterable[str]) -> None:
        self.token_mask: torch.Tensor | None = None
        self.block_amax: dict[str, float] = {}
        self.amax: dict[tuple[str, int, str], float] = {}
        self.tokens: dict[tuple[str, int, str], int] = {}
        self.ran: set[str] = set()
        self._real: torch.Tensor | None = None  # bool [rows] of the experts call running now
        self._handles: list = []
        try:
            for name in modules:
                self.block_amax[name] = 0.0
                module = model.get_submodule(name)
                self._handles.append(
                    module.register_forward_pre_hook(self._block_hook(name), with_kwargs=True)
                )
                self._handles.append(register_expert_input_hook(module, self._expert_hook(name)))
        except BaseException:
            self.remove()
            raise

    @staticmethod
    def _amax(name: str, x: torch.Tensor) -> float:
        value = float(x.detach().abs().amax())
        if not math.isfinite(value):
            raise ValueError(f"non-finite input seen by the experts of {name!r} during calibration")
        return value

    def _block_hook(self, name: str):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor):
                return
            self.ran.add(name)
            x = x.reshape(-1, x.shape[-1])  # [rows, hidden]: the flattened batch the experts get
            mask = self.token_mask
            self._real = mask.reshape(-1) if mask is not None and mask.numel() == len(x) else None
            if self._real is not None:
                x = x[self._real]
            if x.numel():
                self.block_amax[name] = max(self.block_amax[name], self._amax(name, x))

        return hook

    def _expert_hook(self, name: str) -> ExpertInputHook:
        def hook(expert: int, projection: str, x: torch.Tensor, token_idx: torch.Tensor) -> None:
            if self._real is not None:
                x = x[self._real[token_idx]]
            key = (name, expert, projection)
            self.tokens[key] = self.tokens.get(key, 0) + x.shape[0]
            if x.numel():
                self.amax[key] = max(self.amax.get(key, 0.0), self._amax(name, x))

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass(frozen=True)
class ExpertInputStats:
    """What calibration saw of the routed experts, per expert group, and which experts fell back."""

    policy: ExpertInputScale
    observed_amax: Mapping[
        str, float
    ]  # expert group -> max |x| over its routed real tokens (0: none)
    routed_tokens: Mapping[str, int]  # expert group -> real tokens routed to it
    block_input_amax: Mapping[str, float]  # fused experts module -> max |x| of the MoE block input
    fallbacks: Mapping[str, str]  # expert group -> why its own amax was replaced, and by what

    @property
    def fallback_count(self) -> int:
        return len(self.fallbacks)

    def to_dict(self) -> dict:
        return {
            "policy": self.policy.value,
            "observed_amax": dict(self.observed_amax),
            "routed_tokens": dict(self.routed_tokens),
            "block_input_amax": dict(self.block_input_amax),
            "fallbacks": dict(self.fallbacks),
            "fallback_count": self.fallback_count,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ExpertInputStats:
        return cls(
            policy=ExpertInputScale(data["policy"]),
            observed_amax={k: float(v) for k, v in data["observed_amax"].items()},
            routed_tokens={k: int(v) for k, v in data["routed_tokens"].items()},
            block_input_amax={k: float(v) for k, v in data["block_input_amax"].items()},
            fallbacks=dict(data["fallbacks"]),
        )


def resolve_expert_input_amax(
    groups: Iterable[LinearGroup],
    observed: ExpertInputObserver,
    policy: ExpertInputScale = ExpertInputScale.LAYER,
) -> tuple[dict[str, float], ExpertInputStats]:
    """The input amax each expert group is quantized with (finite, > 0), and the record of it.

    An expert group whose routed real tokens were none or all zero falls back: gate/up to the MoE block
    input amax, down to the max over the layer's experts that saw tokens. With ``policy`` ``layer`` every
    group then takes the max over its layer (per projection), as vLLM's FlashInfer kernels serve it.
    Raises ``ValueError`` when a whole MoE layer saw nothing to calibrate on."""
    units: dict[tuple[str, str], list[LinearGroup]] = {}
    seen_amax: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for group in groups:
        slot = group.expert_slots[0]
        key = (slot.module, slot.expert, slot.param)
        seen_amax[group.name] = observed.amax.get(key, 0.0)
        tokens[group.name] = observed.tokens.get(key, 0)
        units.setdefault((slot.module, slot.param), []).append(group)
    resolved: dict[str, float] = {}
    fallbacks: dict[str, str] = {}
    for (module, param), members in units.items():
        valid = [seen_amax[g.name] for g in members if tokens[g.name] and seen_amax[g.name] > 0]
        if param == GATE_UP:
            substitute, source = observed.block_amax.get(module, 0.0), "MoE block input amax"
        else:
            substitute, source = max(valid, default=0.0), "max over the layer's experts with tokens"
        for group in members:
            if tokens[group.name] and seen_amax[group.name] > 0:
                resolved[group.name] = seen_amax[group.name]
                continue
            if not substitute > 0:
                raise ValueError(
                    f"{module}: no non-zero calibration input reached its experts ({param}); "
                    "cannot set their input scales"
                )
            why = "only zero inputs" if tokens[group.name] else "no calibration token routed to it"
            fallbacks[group.name] = f"{why}; uses the {source} {substitute:.6g}"
            resolved[group.name] = substitute
        if policy is ExpertInputScale.LAYER:
            top = max(resolved[g.name] for g in members)
            resolved.update(dict.fromkeys((g.name for g in members), top))
    return resolved, ExpertInputStats(
        policy=policy,
        observed_amax=seen_amax,
        routed_tokens=tokens,
        block_input_amax=dict(observed.block_amax),
        fallbacks=fallbacks,
    )


# ------------------------------------------------------------------------------------------ preset


@dataclass(frozen=True)
class TierPreset:
    """Where a plan starts. ``tiers``: every group of the selection -> its starting tier. ``decided``:
    the groups whose tier the preset settles (a plan keeps them); every other group is a *candidate*
    that the plan may move to any tier, starting from ``tiers[name]``."""

    tiers: Mapping[str, Tier]
    decided: frozenset[str]

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(name for name in self.tiers if name not in self.decided)


def experts_only_preset(
    selection: TargetSelection, tier: Tier, *, candidate_tier: Tier = Tier.BF16
) -> TierPreset:
    """Routed experts at ``tier`` (decided); attention, shared experts and dense MLPs are candidates
    starting at ``candidate_tier`` (high precision): the plan decides whether they earn a lower tier.
    Routers are never groups (``selection.skipped``): they stay high precision whatever the plan."""
    if not tier.quantizes_weights:
        raise ValueError(f"the experts-only preset quantizes the routed experts; got {tier.value}")
    experts = frozenset(g.name for g in selection.groups if g.expert_slots)
    if not experts:
        raise ValueError("no routed experts in this selection: the experts-only preset needs MoE")
    tiers = {g.name: tier if g.name in experts else candidate_tier for g in selection.groups}
    return TierPreset(tiers, experts)
