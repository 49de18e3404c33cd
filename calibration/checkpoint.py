"""NVFP4 checkpoints in compressed-tensors' ``nvfp4-pack-quantized`` format: export, load, emulate.

* :func:`export_nvfp4_checkpoint` writes what vLLM loads: per quantized Linear ``<layer>.weight_packed``
  (uint8 ``[out, in/2]``), ``<layer>.weight_scale`` (float8_e4m3fn ``[out, in/16]``),
  ``<layer>.weight_global_scale`` (fp32 ``[1]``) and, for W4A4, ``<layer>.input_global_scale``
  (fp32 ``[1]``); every other tensor stays in the model dtype. ``config.json`` gets a
  ``quantization_config`` built from compressed-tensors' own pydantic models and written by its
  ``ModelCompressor.update_config``. Fused groups (q/k/v, gate/up) share one weight global scale and
  one input global scale, since vLLM refuses fused parts that differ.
* :func:`load_nvfp4_checkpoint` is our own loader (safetensors only): dequantized weights, and for W4A4
  activation fake-quant on every quantized Linear input. transformers' compressed-tensors path with
  ``dequantize=True`` silently drops activation quantization, so a W4A4 checkpoint would score like
  W4A16 there (DESIGN.md).
* :func:`apply_nvfp4_emulation` fake-quantizes an in-memory model in place, undoably.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from calibration.groups import DEFAULT_IGNORE, LinearGroup, TargetSelection, select_targets
from calibration.models import (
    MODEL_BUILD_LOCK,
    TOKENIZER_FILES,
    ModelLoadError,
    hub_offline,
    load_tokenizer,
    read_model_config,
    resolve_device,
    resolve_dtype,
)
from kernels import (
    dequantize_nvfp4,
    fake_quantize_nvfp4_activation,
    fake_quantize_nvfp4_weight,
    global_scale_from_amax,
    quantize_nvfp4,
)

logger = logging.getLogger(__name__)

NVFP4_FORMAT = "nvfp4-pack-quantized"
QUANT_METHOD = "compressed-tensors"
DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3  # bytes
#: Files that the export itself writes; ``extra_files`` may not replace them.
_RESERVED_FILES = frozenset(
    {"config.json", "model.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES}
)

#: Tensor-name suffixes of a quantized Linear, exactly as compressed-tensors writes them.
WEIGHT_PACKED = "weight_packed"
WEIGHT_SCALE = "weight_scale"
WEIGHT_GLOBAL_SCALE = "weight_global_scale"
INPUT_GLOBAL_SCALE = "input_global_scale"
#: Attribute of a loaded W4A4 model holding its activation fake-quant hook handles.
ACTIVATION_HOOKS_ATTR = "_fp4roll_activation_hooks"


class NVFP4Scheme(str, Enum):
    """``nvfp4``: W4A4 (needs calibrated ``input_global_scale``); ``nvfp4a16``: weights only."""

    W4A4 = "nvfp4"
    W4A16 = "nvfp4a16"

    @property
    def preset(self) -> str:
        """compressed-tensors' preset scheme name."""
        return "NVFP4" if self is NVFP4Scheme.W4A4 else "NVFP4A16"

    @property
    def quantizes_activations(self) -> bool:
        return self is NVFP4Scheme.W4A4


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read as asked."""


@dataclass(frozen=True)
class ExportSummary:
    """What :func:`export_nvfp4_checkpoint` wrote."""

    out_dir: Path
    scheme: NVFP4Scheme
    quantized_layers: tuple[str, ...]
    group_count: int
    skipped: Mapping[str, str]  # Linear name -> why it stays high precision
    bytes_before: int  # the model's state dict in its own dtype (tied tensors once)
    bytes_after: int  # safetensors files written
    shard_count: int
    seconds: float

    @property
    def compression_ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("nan")


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`load_nvfp4_checkpoint` found in a checkpoint."""

    path: Path
    scheme: NVFP4Scheme
    quantized_layers: tuple[str, ...]
    ignored_layers: tuple[str, ...]
    weight_global_scales: Mapping[str, float]
    input_global_scales: Mapping[str, float]  # empty for W4A16
    quantization_config: Mapping[str, Any] = field(repr=False)


# ----------------------------------------------------------------------------------------------
# Selection helpers
# ----------------------------------------------------------------------------------------------


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, nn.Linear)}


def with_fallback(
    selection: TargetSelection, fallback: Mapping[str, str] | Iterable[str] = ()
) -> TargetSelection:
    """``selection`` with the groups named in ``fallback`` moved to ``skipped``.

    ``fallback`` holds group names or member names (a member drags its whole fused group), optionally
    mapped to a reason. Unknown names are an error (a typo must not silently quantize a layer).
    """
    reasons = dict(fallback) if isinstance(fallback, Mapping) else dict.fromkeys(fallback, "")
    if not reasons:
        return selection
    known = (
        {g.name for g in selection.groups}
        | set(selection.quantized_layers)
        | set(selection.skipped)
    )
    unknown = sorted(set(reasons) - known)
    if unknown:
        raise CheckpointError(
            f"fallback names not found among the model's Linear layers: {unknown}"
        )
    groups: list[LinearGroup] = []
    skipped = dict(selection.skipped)
    for group in selection.groups:
        hits = [n for n in (group.name, *group.members) if n in reasons]
        if not hits:
            groups.append(group)
            continue
        reason = reasons[hits[0]] or "fallback plan: kept high precision"
        for member in group.members:
            skipped[member] = reason
    return TargetSelection(groups=tuple(groups), skipped=skipped)


def _group_amax(amax: Mapping[str, float | torch.Tensor], group: LinearGroup) -> float | None:
    """Max of the amax values given for the group (by group name or any member), None if none."""
    values = [
        float(torch.as_tensor(amax[n]).max()) for n in (group.name, *group.members) if n in amax
    ]
    return max(values) if values else None


def _input_global_scales(
    selection: TargetSelection, input_amax: Mapping[str, float | torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Group name -> fp32 [1] ``448*6/amax`` (one per fused group)."""
    scales: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for group in selection.groups:
        amax = _group_amax(input_amax, group)
        if amax is None:
            missing.append(group.name)
            continue
        if not (amax > 0.0 and amax != float("inf")):
            raise CheckpointError(f"input amax of {group.name} must be finite and > 0, got {amax}")
        scales[group.name] = global_scale_from_amax(amax)
    if missing:
        raise CheckpointError(
            f"W4A4 (nvfp4) needs the input amax of every quantized group; missing for "
            f"{len(missing)} group(s), e.g. {missing[:3]}. Run calibration, or export nvfp4a16."
        )
    return scales


def group_weight_global_scale(linears: Mapping[str, nn.Linear], group: LinearGroup) -> torch.Tensor:
    """The shared fp32 [1] global scale of a fused group: ``448*6 / max over members of amax(W)``."""
    amax = max(float(linears[m].weight.detach().abs().max()) for m in group.members)
    return global_scale_from_amax(amax)


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


def build_quantization_config(scheme: NVFP4Scheme, ignore: Sequence[str]):
    """compressed-tensors' ``QuantizationConfig`` for an NVFP4 checkpoint: one group targeting
    ``Linear`` with the preset scheme, ``format`` ``nvfp4-pack-quantized``, status compressed."""
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        preset_name_to_scheme,
    )

    quant_scheme = preset_name_to_scheme(scheme.preset, ["Linear"])
    quant_scheme.format = NVFP4_FORMAT
    return QuantizationConfig(
        config_groups={"group_0": quant_scheme},
        quant_method=QUANT_METHOD,
        format=NVFP4_FORMAT,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    )


def _unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
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


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def quantize_model_tensors(
    model: nn.Module,
    selection: TargetSelection,
    *,
    input_global_scales: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The checkpoint's state dict (CPU, contiguous): NVFP4 triples for the selected Linears,
    ``input_global_scale`` per member when given (keyed by group name), every other tensor as is."""
    linears = _linear_modules(model)
    state = _unique_state_dict(model)
    tensors: dict[str, torch.Tensor] = {}
    quantized_weights = {f"{m}.weight": m for m in selection.quantized_layers}
    for group in selection.groups:
        global_scale = group_weight_global_scale(linears, group)
        for member in group.members:
            packed = quantize_nvfp4(linears[member].weight.detach(), global_scale, name=member)
            tensors[f"{member}.{WEIGHT_PACKED}"] = packed.weight_packed
            tensors[f"{member}.{WEIGHT_SCALE}"] = packed.weight_scale
            # one tensor per member: safetensors refuses tensors sharing memory
            tensors[f"{member}.{WEIGHT_GLOBAL_SCALE}"] = (
                packed.weight_global_scale.reshape(1).to(torch.float32).clone()
            )
            if input_global_scales is not None:
                tensors[f"{member}.{INPUT_GLOBAL_SCALE}"] = (
                    input_global_scales[group.name].reshape(1).to(torch.float32).clone()
                )
    for name, tensor in state.items():
        if name not in quantized_weights:
            tensors[name] = tensor
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


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


def _write_config(
    model: nn.Module, out_dir: Path, quant_config, dtype: torch.dtype | None = None
) -> None:
    """config.json of the model (minus any old quantization_config) + compressed-tensors' section,
    written by compressed-tensors itself, then round-trip validated."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(out_dir))
    ModelCompressor(quantization_config=quant_config).update_config(str(out_dir))

    written = json.loads((out_dir / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(written)
    if parsed.format != NVFP4_FORMAT or sorted(parsed.ignore or []) != sorted(quant_config.ignore):
        raise CheckpointError("quantization_config did not round-trip through compressed-tensors")


def _copy_tokenizer(out_dir: Path, tokenizer: Any, source_dir: Path | None) -> list[str]:
    copied: list[str] = []
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copy2(src, out_dir / name)
                copied.append(name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
        copied.append("tokenizer (saved)")
    return copied


def _check_extra_files(extra_files: Mapping[str, Any]) -> None:
    for name in extra_files:
        payload = extra_files[name]
        is_json = name.endswith(".json") and not isinstance(payload, bytes)
        is_blob = name.endswith(".png") and isinstance(payload, bytes)
        if Path(name).name != name or name in _RESERVED_FILES or not (is_json or is_blob):
            raise CheckpointError(
                f"extra file {name!r}: expected a plain '*.json' name (JSON-able payload) or "
                "'*.png' name (bytes) that the export does not write itself"
            )


@contextmanager
def _atomic_dir(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a temp dir beside ``out_dir``; on success it replaces ``out_dir`` (an existing one only
    with ``overwrite``); on any error it is removed and ``out_dir`` is left untouched."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if out_dir.exists():
            if not overwrite:
                raise FileExistsError(f"{out_dir} appeared while writing; not replacing it")
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old / "previous", out_dir)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def export_nvfp4_checkpoint(
    model: nn.Module,
    out_dir: str | Path,
    *,
    scheme: NVFP4Scheme | str = NVFP4Scheme.W4A16,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    selection: TargetSelection | None = None,
    fallback: Mapping[str, str] | Iterable[str] = (),
    input_amax: Mapping[str, float | torch.Tensor] | None = None,
    source_dir: str | Path | None = None,
    tokenizer: Any = None,
    extra_files: Mapping[str, Any] | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> ExportSummary:
    """Write ``model`` as a compressed-tensors NVFP4 checkpoint at ``out_dir``, atomically.

    Preconditions: ``model`` is a transformers causal LM with finite weights. ``selection`` (default
    ``select_targets(model, ignore)``) decides the quantized groups; ``fallback`` (group or layer
    names, optionally -> reason) keeps more groups high precision. W4A4 (``scheme="nvfp4"``) needs
    ``input_amax`` (module or group name -> calibrated input abs-max) for every quantized group; fused
    members get one ``input_global_scale = 448*6/max(amax)``. Tokenizer and generation config files are
    copied from ``source_dir`` and/or saved from ``tokenizer``; ``extra_files`` (name -> JSON-able) are
    written beside (e.g. ``calibration.json``; ``*.png`` names take bytes). ``lm_head`` is never quantized. An existing
    ``out_dir`` is refused unless ``overwrite`` (then replaced atomically). ``dtype``: of the
    unquantized tensors and ``config.json`` (default: the model's own), e.g. the source checkpoint's
    bf16 when calibration ran in fp32.
    """
    started = time.perf_counter()
    scheme = NVFP4Scheme(scheme)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite)")
    extra_files = dict(extra_files or {})
    _check_extra_files(extra_files)

    selection = with_fallback(selection or select_targets(model, ignore=ignore), fallback)
    heads = [m for m in selection.quantized_layers if m == "lm_head" or m.endswith(".lm_head")]
    if heads:
        raise CheckpointError(f"lm_head is never quantized (logit precision); got {heads}")
    if scheme.quantizes_activations:
        if input_amax is None:
            raise CheckpointError(
                "W4A4 (nvfp4) needs calibrated activation amax (input_amax); use nvfp4a16 for a "
                "weight-only checkpoint, or run `fp4roll recalibrate`"
            )
        input_scales: dict[str, torch.Tensor] | None = _input_global_scales(selection, input_amax)
    else:
        input_scales = None

    linears = _linear_modules(model)
    ignored = sorted(n for n in linears if n not in set(selection.quantized_layers))
    skipped = {n: selection.skipped.get(n, "not selected") for n in ignored}
    quant_config = build_quantization_config(scheme, ignored)
    state = _unique_state_dict(model).values()
    bytes_before = (
        _tensor_bytes(state)
        if dtype is None  # else: what the model weighs in the dtype it is exported in
        else sum(
            t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
            for t in state
        )
    )

    tensors = quantize_model_tensors(model, selection, input_global_scales=input_scales)
    if dtype is not None:  # e.g. calibrated in fp32, served in the source checkpoint's bf16
        nvfp4 = (WEIGHT_PACKED, WEIGHT_SCALE, WEIGHT_GLOBAL_SCALE, INPUT_GLOBAL_SCALE)
        tensors = {
            name: t.to(dtype) if t.is_floating_point() and not name.endswith(nvfp4) else t
            for name, t in tensors.items()
        }
    with _atomic_dir(out_dir, overwrite=overwrite) as tmp:
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
                (tmp / name).write_text(
                    json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
                )

    summary = ExportSummary(
        out_dir=out_dir,
        scheme=scheme,
        quantized_layers=selection.quantized_layers,
        group_count=len(selection.groups),
        skipped=skipped,
        bytes_before=bytes_before,
        bytes_after=bytes_after,
        shard_count=shard_count,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "wrote %s (%s): %d layers in %d groups quantized, %d kept high precision, %.1f MB -> %.1f MB",
        out_dir,
        scheme.value,
        len(summary.quantized_layers),
        summary.group_count,
        len(skipped),
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


def read_nvfp4_quantization_config(path: str | Path):
    """The checkpoint's ``quantization_config`` parsed by compressed-tensors, with its scheme."""
    from compressed_tensors.quantization import QuantizationConfig

    config = read_model_config(path)
    raw = config.get("quantization_config")
    if not raw or raw.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{path}: config.json has no compressed-tensors quantization_config")
    parsed = QuantizationConfig.model_validate(raw)
    schemes = list(parsed.config_groups.values())
    formats = {parsed.format, *(s.format for s in schemes if s.format is not None)}
    if formats != {NVFP4_FORMAT}:
        raise CheckpointError(
            f"{path}: format {sorted(map(str, formats))}, expected {NVFP4_FORMAT}"
        )
    w4a4 = any(s.input_activations is not None for s in schemes)
    return parsed, NVFP4Scheme.W4A4 if w4a4 else NVFP4Scheme.W4A16


def _install_activation_quant(
    module: nn.Module, input_global_scale: torch.Tensor
) -> torch.utils.hooks.RemovableHandle:
    """Fake-quantize the input of ``module`` (W4A4 emulation) with a static global scale."""
    scale = input_global_scale.reshape(1).to(torch.float32)

    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        return (fake_quantize_nvfp4_activation(x, scale.to(x.device)), *args[1:])

    return module.register_forward_pre_hook(hook)


@torch.no_grad()
def load_nvfp4_checkpoint(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = "cpu",
) -> tuple[nn.Module, Any, CheckpointInfo]:
    """Load a compressed-tensors NVFP4 checkpoint as a plain transformers model (eval mode).

    Weights are dequantized with ``kernels.dequantize_nvfp4``; for W4A4 checkpoints every quantized
    Linear gets a forward pre-hook fake-quantizing its input under the stored ``input_global_scale``.
    Safetensors only. ``dtype`` None -> the dtype recorded in config.json. Returns (model, tokenizer or
    None, info).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    quant_config, scheme = read_nvfp4_quantization_config(path)
    with hub_offline():
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    torch_dtype = resolve_dtype(dtype) or getattr(config, "dtype", None) or torch.float32
    if isinstance(torch_dtype, str):
        torch_dtype = resolve_dtype(torch_dtype)
    target = resolve_device(device)

    tensors = _read_checkpoint_tensors(path)
    quantized = sorted(k[: -len(WEIGHT_PACKED) - 1] for k in tensors if k.endswith(WEIGHT_PACKED))
    state: dict[str, torch.Tensor] = {}
    weight_scales: dict[str, float] = {}
    input_scales: dict[str, torch.Tensor] = {}
    for layer in quantized:
        try:
            packed = tensors.pop(f"{layer}.{WEIGHT_PACKED}")
            scale = tensors.pop(f"{layer}.{WEIGHT_SCALE}")
            global_scale = tensors.pop(f"{layer}.{WEIGHT_GLOBAL_SCALE}")
        except KeyError as exc:
            raise CheckpointError(f"{path}: {layer} lacks {exc.args[0]}") from None
        # dequantize where the model will run (Triton on CUDA, vectorized torch on CPU)
        state[f"{layer}.weight"] = dequantize_nvfp4(
            packed.to(target), scale.to(target), global_scale.to(target), dtype=torch_dtype
        )
        weight_scales[layer] = float(global_scale.reshape(-1)[0])
        input_scale = tensors.pop(f"{layer}.{INPUT_GLOBAL_SCALE}", None)
        if input_scale is not None:
            input_scales[layer] = input_scale
        elif scheme.quantizes_activations:
            raise CheckpointError(f"{path}: W4A4 checkpoint but {layer} has no input_global_scale")
    for name, tensor in tensors.items():
        state[name] = tensor.to(torch_dtype) if tensor.is_floating_point() else tensor

    with MODEL_BUILD_LOCK, torch.device(target):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = _tied_parameter_names(model)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match the model built from config.json: missing "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.to(target)
    model.eval()

    modules = dict(model.named_modules())
    if scheme.quantizes_activations:
        hooks = [_install_activation_quant(modules[layer], s) for layer, s in input_scales.items()]
        setattr(model, ACTIVATION_HOOKS_ATTR, hooks)
    linears = _linear_modules(model)
    info = CheckpointInfo(
        path=path,
        scheme=scheme,
        quantized_layers=tuple(quantized),
        ignored_layers=tuple(sorted(n for n in linears if n not in set(quantized))),
        weight_global_scales=weight_scales,
        input_global_scales={k: float(v.reshape(-1)[0]) for k, v in input_scales.items()},
        quantization_config=quant_config.model_dump(mode="json"),
    )
    logger.info(
        "loaded %s (%s): %d quantized Linear layers, %d high precision, dtype %s",
        path,
        scheme.value,
        len(quantized),
        len(info.ignored_layers),
        torch_dtype,
    )
    return model, load_tokenizer(path), info


def remove_activation_quantization(model: nn.Module) -> int:
    """Remove the W4A4 input fake-quant hooks :func:`load_nvfp4_checkpoint` installed (the model then
    behaves as W4A16); return how many were removed."""
    hooks = getattr(model, ACTIVATION_HOOKS_ATTR, [])
    for hook in hooks:
        hook.remove()
    if hasattr(model, ACTIVATION_HOOKS_ATTR):
        delattr(model, ACTIVATION_HOOKS_ATTR)
    return len(hooks)


def _tied_parameter_names(model: nn.Module) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


# ----------------------------------------------------------------------------------------------
# In-memory emulation
# ----------------------------------------------------------------------------------------------


class NVFP4Emulation:
    """Handle returned by :func:`apply_nvfp4_emulation`; ``remove()`` (or leaving the ``with``
    block) restores the original weights and removes the activation hooks."""

    def __init__(self) -> None:
        self._originals: dict[str, tuple[nn.Linear, torch.Tensor]] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.weight_global_scales: dict[str, torch.Tensor] = {}  # group name -> fp32 [1]

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self._originals)

    @property
    def active(self) -> bool:
        return bool(self._originals or self._hooks)

    @torch.no_grad()
    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        for module, original in self._originals.values():
            module.weight.copy_(original)
        self._originals.clear()

    def __enter__(self) -> NVFP4Emulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@torch.no_grad()
def apply_nvfp4_emulation(
    model: nn.Module,
    selection: TargetSelection,
    input_global_scales: Mapping[str, float | torch.Tensor] | None = None,
    groups: Iterable[str] | None = None,
) -> NVFP4Emulation:
    """Fake-quantize (quantize + dequantize, NVFP4) the weights of ``selection``'s groups in place.

    ``groups`` restricts to those group names (default: all). With ``input_global_scales`` (keyed by
    group name or any member name; fp32 ``448*6/amax``), the inputs of those groups' Linears are
    fake-quantized too (W4A4); groups without an entry stay W4A16. Fused groups share one weight
    global scale. The original weights are kept (a copy per touched layer) so the handle can undo it.
    """
    wanted = None if groups is None else set(groups)
    if wanted is not None:
        unknown = wanted - {g.name for g in selection.groups}
        if unknown:
            raise CheckpointError(f"unknown group name(s): {sorted(unknown)}")
    linears = _linear_modules(model)
    handle = NVFP4Emulation()
    try:
        for group in selection.groups:
            if wanted is not None and group.name not in wanted:
                continue
            global_scale = group_weight_global_scale(linears, group)
            handle.weight_global_scales[group.name] = global_scale
            input_scale = None
            if input_global_scales is not None:
                keys = [n for n in (group.name, *group.members) if n in input_global_scales]
                if keys:
                    input_scale = torch.as_tensor(input_global_scales[keys[0]], dtype=torch.float32)
            for member in group.members:
                module = linears[member]
                weight = module.weight
                fake = fake_quantize_nvfp4_weight(
                    weight.detach(), global_scale.to(weight.device), name=member
                )
                handle._originals[member] = (module, weight.detach().clone())
                weight.copy_(fake.to(weight.dtype))
                if input_scale is not None:
                    handle._hooks.append(_install_activation_quant(module, input_scale))
    except BaseException:
        handle.remove()
        raise
    return handle


__all__ = [
    "CheckpointError",
    "CheckpointInfo",
    "ExportSummary",
    "INPUT_GLOBAL_SCALE",
    "NVFP4Emulation",
    "NVFP4Scheme",
    "NVFP4_FORMAT",
    "WEIGHT_GLOBAL_SCALE",
    "WEIGHT_PACKED",
    "WEIGHT_SCALE",
    "apply_nvfp4_emulation",
    "build_quantization_config",
    "export_nvfp4_checkpoint",
    "group_weight_global_scale",
    "load_nvfp4_checkpoint",
    "quantize_model_tensors",
    "read_nvfp4_quantization_config",
    "remove_activation_quantization",
    "with_fallback",
    "ModelLoadError",
]
