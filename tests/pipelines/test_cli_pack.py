"""`fp4roll pack` and `fp4roll models prepare` through typer's CliRunner (the real commands)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from calibration.checkpoint import load_checkpoint
from pipelines.cli import app
from tests.conftest import assert_greedy_generation

runner = CliRunner()


def _pack(*args: str):
    return runner.invoke(app, ["pack", *args], catch_exceptions=False)


def _assert_checkpoint_ok(out: Path) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(raw)
    assert parsed.format == "nvfp4-pack-quantized" and "lm_head" in parsed.ignore
    model, tokenizer, info = load_checkpoint(out)
    scales = info.weight_global_scales
    for layer in {name.rsplit(".", 2)[0] for name in info.quantized_layers}:
        if f"{layer}.self_attn.q_proj" in scales:  # fused groups share their global scale
            q, k, v = (scales[f"{layer}.self_attn.{p}_proj"] for p in "qkv")
            assert q == k == v
            assert scales[f"{layer}.mlp.gate_proj"] == scales[f"{layer}.mlp.up_proj"]
    assert_greedy_generation(model, tokenizer, "The capital of France is")


def test_pack_tiny_llama(tiny_llama_dir, tmp_path):
    out = tmp_path / "nvfp4"
    result = _pack(tiny_llama_dir, str(out), "--ignore", "model.layers.1.mlp.down_proj")
    assert result.exit_code == 0, result.output
    assert "quantized Linear layers" in result.output and "13 in 7 groups" in result.output
    assert "model.layers.1.mlp.down_proj" in result.output  # listed with its reason
    _assert_checkpoint_ok(out)
    raw = json.loads((out / "config.json").read_text())["quantization_config"]
    assert sorted(raw["ignore"]) == ["lm_head", "model.layers.1.mlp.down_proj"]
    assert (out / "tokenizer.json").is_file()

    # an existing OUT_DIR is refused without --overwrite, replaced with it
    again = _pack(tiny_llama_dir, str(out))
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert _pack(tiny_llama_dir, str(out), "--overwrite", "--dtype", "fp32").exit_code == 0
    model, _, _ = load_checkpoint(out)
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_pack_refuses_w4a4_and_points_to_recalibrate(tiny_llama_dir, tmp_path):
    result = _pack(tiny_llama_dir, str(tmp_path / "out"), "--scheme", "nvfp4")
    assert result.exit_code == 2
    assert "recalibrate" in result.output
    assert not (tmp_path / "out").exists()
    help_text = runner.invoke(app, ["pack", "--help"]).output
    assert "recalibrate" in help_text and "nvfp4a16" in help_text


def test_pack_refuses_pickled_only_folder_unless_allowed(tiny_llama_dir, tmp_path):
    from calibration.models import load_causal_lm

    src = tmp_path / "pickled"
    src.mkdir()
    for f in Path(tiny_llama_dir).iterdir():
        if f.suffix != ".safetensors":
            shutil.copy2(f, src / f.name)
    state = load_causal_lm(tiny_llama_dir).model.state_dict()
    state.pop("lm_head.weight")
    torch.save(state, src / "pytorch_model.bin")

    refused = _pack(str(src), str(tmp_path / "out"))
    assert refused.exit_code == 1 and "--allow-pickle" in refused.output.replace("\n", "")
    assert not (tmp_path / "out").exists()
    assert _pack(str(src), str(tmp_path / "out"), "--allow-pickle").exit_code == 0


@pytest.mark.slow
def test_pack_smollm2(smollm2_dir, tmp_path, capsys):
    prepared = runner.invoke(app, ["models", "prepare", "smollm2", "--cache-dir", smollm2_dir])
    assert prepared.exit_code == 0 and prepared.output.strip() == smollm2_dir

    out = tmp_path / "smollm2-nvfp4"
    started = time.perf_counter()
    result = _pack(smollm2_dir, str(out))
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert "210 in 120 groups" in result.output  # 30 blocks x (qkv, o, gate_up, down)
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    source = sum(p.stat().st_size for p in Path(smollm2_dir).glob("*.safetensors"))
    with capsys.disabled():
        print(
            f"\n[smollm2 pack] {elapsed:.1f} s, checkpoint {size / 1e6:.1f} MB "
            f"(bf16 source {source / 1e6:.1f} MB)"
        )
    _assert_checkpoint_ok(out)
