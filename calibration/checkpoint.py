"""Quantized checkpoints in compressed-tensors' format: export and load.

* :func:`export_checkpoint` writes what vLLM loads from the groups :mod:`calibration.emulate` quantized:
  per NVFP4 Linear ``<layer>.weight_packed`` (uint8 ``[out, in/2]``), ``<layer>.weight_scale``
  (float8_e4m3fn ``[out, in/16]``), ``<layer>.weight_global_scale`` (fp32 ``[1]``) and, for W4A4,
  ``<layer>.input_global_scale`` (fp32 ``[1]``); per FP8 Linear ``<layer>.weight`` (float8_e4m3fn) and
  ``<layer>.weight_scale`` (fp32 ``[out, 1]``); every other tensor in the storage dtype (bf16 by default,
  whatever dtype calibration ran in). Tensor names are the ones ``save_pretrained`` writes: routed MoE
  experts per expert (Mixtral ``block_sparse_moe.experts.<e>.w1|w3|w2``, Qwen
  ``mlp.experts.<e>.gate_proj|up_proj|down_proj``), as vLLM loads them (:mod:`calibration.moe`).
  ``config.json`` gets a ``quantization_config`` built from
  compressed-tensors' own pydantic models and written by its ``ModelCompressor.update_config``: one
  ``config_groups`` entry per tier, format ``mixed-precision`` when there are several.
* :func:`load_checkpoint` is our own loader (safetensors only): every quantized Linear decoded and its
  activation fake-quant installed by :mod:`calibration.emulate`, so a reloaded checkpoint computes what
  the calibration emulated. transformers' compressed-tensors path with ``dequantize=True`` silently
  drops activation quantization, so a W4A4 checkpoint would score like W4A16 there (DESIGN.md).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration import moe
from calibration.atomic import atomic_dir
from calibration.emulate import (
    INPUT_GLOBAL_SCALE,
    QUANTIZED_SUFFIXES,
    WEIGHT,
    WEIGHT_GLOBAL_SCALE,
    WEIGHT_PACKED,
    WEIGHT_SCALE,
    GroupQuantization,
    QuantizedLinear,
    install_input_quantizers,
    linear_modules,
)
from calibration.models import (
    MODEL_BUILD_LOCK,
    TOKENIZER_FILES,
    hub_offline,
    load_tokenizer,
    read_model_config,
    resolve_device,
    resolve_dtype,
    tied_parameter_names,
)
from calibration.precision import Tier

logger = logging.getLogger(__name__)

QUANT_METHOD = "compressed-tensors"
MIXED_PRECISION_FORMAT = "mixed-precision"
DEFAULT_STORAGE_DTYPE = torch.bfloat16
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3  # bytes
#: Files that the export itself writes; ``extra_files`` may not replace them.
_RESERVED_FILES = frozenset(
    {"config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES}
)
#: Attribute of a loaded model holding its activation fake-quant hook handles.
ACTIVATION_HOOKS_ATTR = "_fp4roll_activation_hooks"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked."""


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_checkpoint` wrote."""

    out_dir: Path
    tiers: Mapping[str, Tier]  # quantized Linear -> tier (BF16 groups are listed in ``skipped``)
    group_count: int  # fused groups written quantized
    skipped: Mapping[str, str]  # Linear name -> why it stays high precision
    bytes_before: int  # the model's state dict in the storage dtype (tied tensors once)
    bytes_after: int  # safetensors files written
    bytes_by_tier: Mapping[str, int]  # tier value (and "other" for non-Linear tensors) -> bytes
    shard_count: int
    seconds: float

    @property
    def quantized_layers(self) -> tuple[str, ...]:
        return tuple(self.tiers)

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_checkpoint` found in a checkpoint."""

    path: Path
    tiers: Mapping[str, Tier]  # quantized Linear -> tier
    ignored_layers: tuple[str, ...]
    weight_global_scales: Mapping[str, float]  # NVFP4 layers
    input_global_scales: Mapping[str, float]  # NVFP4 W4A4 layers
    quantization_config: Mapping[str, Any] = field(repr=False)

    @property
    def quantized_layers(self) -> tuple[str, ...]:
        return tuple(self.tiers)

    @property
    def quantizes_activations(self) -> bool:
        return any(t.quantizes_activations for t in self.tiers.values())


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def build_quantization_config(groups: Sequence[GroupQuantization], ignore: Sequence[str]):
    """compressed-tensors' ``QuantizationConfig`` for ``groups``: one config group per quantized tier.

    A single tier targets ``Linear`` (everything not in ``ignore``; vLLM extends it to its FusedMoE
    layers), as llm-compressor writes it; several tiers list their layers by name (routed experts: one
    regex per MoE layer, :func:`calibration.moe.expert_config_entries`) and the global format is
    ``mixed-precision``.
    """
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        preset_name_to_scheme,
    )

    by_tier: dict[Tier, list[str]] = {}
    experts: dict[Tier, list[str]] = {}
    for group in groups:
        if group.tier.quantizes_weights:
            names = experts if group.group.expert_slots else by_tier
            names.setdefault(group.tier, []).extend(m.name for m in group.members)
            by_tier.setdefault(group.tier, [])
    if not by_tier:
        raise CheckpointError("nothing to quantize: every group is high precision")
    for tier, members in experts.items():
        by_tier[tier].extend(moe.expert_config_entries(members))
    mixed = len(by_tier) > 1
    config_groups = {}
    for index, (tier, layers) in enumerate(sorted(by_tier.items(), key=lambda kv: kv[0].value)):
        scheme = preset_name_to_scheme(tier.preset, layers if mixed else ["Linear"])
        scheme.format = tier.format
        config_groups[f"group_{index}"] = scheme
    return QuantizationConfig(
        config_groups=config_groups,
        quant_method=QUANT_METHOD,
        format=MIXED_PRECISION_FORMAT if mixed else next(iter(by_tier)).format,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    )


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with tied tensors kept once (first name wins, as save_pretrained)."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.device.type != "meta" and key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


def _stored_itemsize(tensor: torch.Tensor, dtype: torch.dtype) -> int:
    return dtype.itemsize if tensor.is_floating_point() else tensor.element_size()


def checkpoint_tensors(
    model: nn.Module, groups: Sequence[GroupQuantization], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict (CPU, contiguous): each quantized member's tensors, every other tensor
    of the model (BF16-tier Linears and experts included) cast to the storage ``dtype``, under the
    names transformers saves (:func:`calibration.moe.to_checkpoint_state`)."""
    quantized: dict[str, torch.Tensor] = {}
    replaced: set[str] = set()
    for group in groups:
        if not group.tier.quantizes_weights:
            continue
        for layer in group.members:
            replaced.add(f"{layer.name}.{WEIGHT}")
            for suffix, tensor in layer.tensors.items():
                quantized[f"{layer.name}.{suffix}"] = tensor
    state = {n: t for n, t in unique_state_dict(model).items() if n not in replaced}
    members = {m.name for g in groups if g.tier.quantizes_weights for m in g.members}
    try:
        plain = moe.to_checkpoint_state(model, state, members)
    except moe.MoeLayoutError as exc:
        raise CheckpointError(str(exc)) from exc
    tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in plain.items()}
    tensors.update(quantized)
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def _bytes_by_tier(
    tensors: Mapping[str, torch.Tensor], tiers: Mapping[str, Tier], unquantized: set[str]
) -> dict[str, int]:
    """Checkpoint bytes per tier: quantized Linears under their tier, unquantized Linears' weights as
    ``bf16`` (the high-precision tier, whatever the storage dtype), everything else as ``other``."""
    out: dict[str, int] = {}
    for name, tensor in tensors.items():
        layer, _, suffix = name.rpartition(".")
        if layer in tiers:
            key = tiers[layer].value
        elif suffix == WEIGHT and layer in unquantized:
            key = Tier.BF16.value
        else:
            key = "other"
        out[key] = out.get(key, 0) + tensor.numel() * tensor.element_size()
    return out


def checkpoint_bytes_by_tier(
    model: nn.Module, groups: Sequence[GroupQuantization], dtype: torch.dtype
) -> dict[str, int]:
    """What :func:`export_checkpoint` will report as ``bytes_by_tier`` for these groups."""
    quantized = [g for g in groups if g.tier.quantizes_weights]
    tiers = {m.name: g.tier for g in quantized for m in g.members}
    unquantized = set(_unquantized_layers(model, tiers))
    return _bytes_by_tier(checkpoint_tensors(model, quantized, dtype), tiers, unquantized)


def _unquantized_layers(model: nn.Module, tiers: Mapping[str, Tier]) -> list[str]:
    """Linears and routed expert projections (checkpoint names) that stay high precision."""
    experts = moe.checkpoint_layout(model).slots
    return sorted(n for n in [*linear_modules(model), *experts] if n not in tiers)


def _write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str
) -> tuple[int, int]:
    """Write ``tensors`` as one file or shards + index json; return (bytes written, shard count)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    written = 0
    for filename, names in split.filename_to_tensors.items():
        path = out_dir / filename
        save_file({n: tensors[n] for n in names}, str(path), metadata={"format": "pt"})
        written += path.stat().st_size
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return written, len(split.filename_to_tensors)


def _write_config(model: nn.Module, out_dir: Path, quant_config, dtype: torch.dtype) -> None:
    """config.json of the model (minus any old quantization_config, ``dtype`` = the storage dtype) +
    compressed-tensors' section, written by compressed-tensors itself, then round-trip validated."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.save_pretrained(str(out_dir))
    ModelCompressor(quantization_config=quant_config).update_config(str(out_dir))

    written = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(written)
    if parsed.format != quant_config.format or sorted(parsed.ignore or []) != sorted(
        quant_config.ignore
    ):
        raise CheckpointError("quantization_config did not round-trip through compressed-tensors")


def _copy_tokenizer(out_dir: Path, tokenizer: Any, source_dir: Path | None) -> None:
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copy2(src, out_dir / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def _check_extra_files(extra_files: Mapping[str, Any]) -> None:
    for name, payload in extra_files.items():
        is_json = name.endswith(".json") and not isinstance(payload, bytes)
        is_blob = name.endswith(".png") and isinstance(payload, bytes)
        if Path(name).name != name or name in _RESERVED_FILES or not (is_json or is_blob):
            raise CheckpointError(
                f"extra file {name!r}: expected a plain '*.json' name (JSON-able payload) or "
                "'*.png' name (bytes) that the export does not write itself"
            )


def _is_lm_head(name: str) -> bool:
    return name == "lm_head" or name.endswith(".lm_head")


@torch.no_grad()
def export_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    groups: Sequence[GroupQuantization],
    *,
    skipped: Mapping[str, str] | None = None,
    source_dir: str | Path | None = None,
    tokenizer: Any = None,
    extra_files: Mapping[str, Any] | None = None,
    dtype: torch.dtype = DEFAULT_STORAGE_DTYPE,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> ExportSummary:
    """Write ``model`` with ``groups`` quantized (:func:`calibration.emulate.quantize_group`) as a
    compressed-tensors checkpoint at ``out_dir``, atomically.

    Preconditions: ``model`` is a transformers causal LM; ``groups`` were quantized from it. Linears in no
    quantized group stay in ``dtype`` and go to the config's ``ignore`` list (``skipped`` says why, for the
    summary; a BF16-tier group is listed with its tier). ``lm_head`` is never quantized. Tokenizer and
    generation config files are copied from ``source_dir`` and/or saved from ``tokenizer``; ``extra_files``
    (name -> JSON-able, or ``*.png`` -> bytes) are written beside. An existing ``out_dir`` is refused
    unless ``overwrite`` (then replaced atomically).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite)")
    extra_files = dict(extra_files or {})
    _check_extra_files(extra_files)
    quantized = [g for g in groups if g.tier.quantizes_weights]
    tiers = {m.name: g.tier for g in quantized for m in g.members}
    heads = [name for name in tiers if _is_lm_head(name)]
    if heads:
        raise CheckpointError(f"lm_head is never quantized (logit precision); got {heads}")
    try:
        moe.check_expert_tiers((g.group, g.tier) for g in groups)
    except moe.MoeLayoutError as exc:
        raise CheckpointError(str(exc)) from exc

    reasons = dict(skipped or {})
    for group in groups:
        if not group.tier.quantizes_weights:
            reasons.update(dict.fromkeys(group.group.members, f"tier {group.tier.value}"))
    layout = moe.checkpoint_layout(model)
    routers = [r for layer in layout.moe_layers for r in layer.routers]
    ignored = sorted({*_unquantized_layers(model, tiers), *routers})
    reasons = {n: reasons.get(n, "not selected") for n in ignored}
    # the config lists Linears and routers by name, high-precision MoE layers by one regex each
    experts = set(layout.slots)
    config_ignore = sorted(n for n in ignored if n not in experts)
    config_ignore += moe.expert_config_entries(n for n in ignored if n in experts)
    quant_config = build_quantization_config(quantized, config_ignore)

    state = unique_state_dict(model).values()
    bytes_before = sum(t.numel() * _stored_itemsize(t, dtype) for t in state)
    tensors = checkpoint_tensors(model, quantized, dtype)
    bytes_by_tier = _bytes_by_tier(tensors, tiers, set(ignored) - set(routers))

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        bytes_after, shard_count = _write_safetensors(tensors, tmp, max_shard_size)
        _write_config(model, tmp, quant_config, dtype)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        _copy_tokenizer(tmp, tokenizer, Path(source_dir) if source_dir else None)
        for name, payload in extra_files.items():
            if isinstance(payload, bytes):
                (tmp / name).write_bytes(payload)
            else:
                text = json.dumps(payload, indent=2, sort_keys=True, default=str)
                (tmp / name).write_text(text + "\n")

    summary = ExportSummary(
        out_dir=out_dir,
        tiers=tiers,
        group_count=len(quantized),
        skipped=reasons,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        bytes_by_tier=bytes_by_tier,
        shard_count=shard_count,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "wrote %s: %d Linear layers in %d groups quantized (%s), %d high precision, "
        "%.1f MB -> %.1f MB",
        out_dir,
        len(tiers),
        summary.group_count,
        ", ".join(sorted({t.value for t in tiers.values()})),
        len(ignored),
        bytes_before / 1e6,
        bytes_after / 1e6,
    )
    return summary


# ----------------------------------------------------------------------------------------------
# Load
# ----------------------------------------------------------------------------------------------


def _read_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint (single file or index + shards). Never unpickles."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors


def read_quantization_config(path: str | Path):
    """The checkpoint's ``quantization_config`` parsed by compressed-tensors (formats checked)."""
    from compressed_tensors.quantization import QuantizationConfig

    raw = read_model_config(path).get("quantization_config")
    if not raw or raw.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}: config.json has no compressed-tensors quantization_config")
    parsed = QuantizationConfig.model_validate(raw)
    known = {t.format for t in Tier if t.format} | {MIXED_PRECISION_FORMAT}
    formats = {parsed.format, *(s.format for s in parsed.config_groups.values() if s.format)}
    unknown = sorted(str(f) for f in formats if f is not None and str(f) not in known)
    if unknown:
        raise CheckpointError(f"{path}: format(s) {unknown} not supported; expected one of {known}")
    return parsed


def _fp8_has_dynamic_inputs(quant_config) -> bool:
    """Whether the checkpoint's FP8 layers quantize their inputs (W8A8) or not (W8A16)."""
    fp8 = [
        s
        for s in quant_config.config_groups.values()
        if s.weights is not None and s.weights.num_bits == 8 and s.weights.type == "float"
    ]
    dynamic = {s.input_activations is not None for s in fp8}
    if len(dynamic) > 1:
        raise CheckpointError("FP8 layers with and without input quantization in one checkpoint")
    if dynamic == {False}:
        raise CheckpointError("FP8 weight-only (W8A16) layers are not a tier fp4roll emulates")
    return True


def _quantized_layers(
    path: Path, tensors: dict[str, torch.Tensor], quant_config
) -> list[QuantizedLinear]:
    """Pop every quantized Linear's tensors out of ``tensors`` and tell its tier from them."""
    layers: list[QuantizedLinear] = []
    packed = sorted(k[: -len(WEIGHT_PACKED) - 1] for k in tensors if k.endswith(WEIGHT_PACKED))
    for name in packed:
        own = {
            s: tensors.pop(f"{name}.{s}") for s in QUANTIZED_SUFFIXES if f"{name}.{s}" in tensors
        }
        missing = [s for s in (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_GLOBAL_SCALE) if s not in own]
        if missing:
            raise CheckpointError(f"{path}: {name} lacks {missing}")
        tier = Tier.NVFP4 if INPUT_GLOBAL_SCALE in own else Tier.NVFP4A16
        layers.append(QuantizedLinear(name, tier, own))
    fp8 = sorted(
        k[: -len(WEIGHT) - 1]
        for k, v in tensors.items()
        if k.endswith(f".{WEIGHT}") and v.dtype == torch.float8_e4m3fn
    )
    if fp8:
        _fp8_has_dynamic_inputs(quant_config)
    for name in fp8:
        scale = tensors.pop(f"{name}.{WEIGHT_SCALE}", None)
        if scale is None:
            raise CheckpointError(f"{path}: FP8 layer {name} has no weight_scale")
        own = {WEIGHT: tensors.pop(f"{name}.{WEIGHT}"), WEIGHT_SCALE: scale}
        layers.append(QuantizedLinear(name, Tier.FP8, own))
    if (any(layer.tier is Tier.NVFP4 for layer in layers)) and not any(
        s.input_activations is not None for s in quant_config.config_groups.values()
    ):
        raise CheckpointError(f"{path}: input_global_scale tensors but no input quantization")
    return layers


@torch.no_grad()
def load_checkpoint(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
) -> tuple[nn.Module, Any, CheckpointInfo]:
    """Load a compressed-tensors checkpoint (NVFP4 / FP8 / mixed) as a plain transformers model (eval).

    Every quantized Linear's weight is decoded and its activation fake-quant installed exactly as
    :func:`calibration.emulate.emulate` does. Safetensors only. ``dtype`` None -> the dtype recorded in
    config.json. Returns (model, tokenizer or None, info).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    quant_config = read_quantization_config(path)
    with hub_offline():
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch_dtype = resolve_dtype(dtype) or getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = resolve_dtype(torch_dtype)
    target = resolve_device(device)

    tensors = _read_checkpoint_tensors(path)
    layers = _quantized_layers(path, tensors, quant_config)
    state = {f"{layer.name}.{WEIGHT}": layer.dequantized_weight(torch_dtype) for layer in layers}
    for name, tensor in tensors.items():
        state[name] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor

    with MODEL_BUILD_LOCK, torch.device(target):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    try:
        state = moe.to_model_state(model, state)  # checkpoint names -> model (fused experts)
    except moe.MoeLayoutError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in tied_parameter_names(model)]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the model built from config.json: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.to(target)
    model.eval()
    setattr(model, ACTIVATION_HOOKS_ATTR, install_input_quantizers(model, layers))

    tiers = {layer.name: layer.tier for layer in layers}
    info = CheckpointInfo(
        path=path,
        tiers=tiers,
        ignored_layers=tuple(_unquantized_layers(model, tiers)),
        weight_global_scales={
            layer.name: float(layer.tensors[WEIGHT_GLOBAL_SCALE].reshape(-1)[0])
            for layer in layers
            if layer.tier.is_nvfp4
        },
        input_global_scales={
            layer.name: float(layer.input_global_scale.reshape(-1)[0])
            for layer in layers
            if layer.input_global_scale is not None
        },
        quantization_config=quant_config.model_dump(mode="json"),
    )
    logger.info(
        "loaded %s: %d quantized Linear layers (%s), %d high precision, dtype %s",
        path,
        len(tiers),
        ", ".join(sorted({t.value for t in tiers.values()})),
        len(info.ignored_layers),
        torch_dtype,
    )
    return model, load_tokenizer(path), info


def remove_activation_quantization(model: nn.Module) -> int:
    """Remove the input fake-quant hooks :func:`load_checkpoint` installed (W4A4 then behaves as W4A16,
    W8A8 as W8A16); return how many were removed."""
    hooks = getattr(model, ACTIVATION_HOOKS_ATTR, [])
    for hook in hooks:
        hook.remove()
    if hasattr(model, ACTIVATION_HOOKS_ATTR):
        delattr(model, ACTIVATION_HOOKS_ATTR)
    return len(hooks)
