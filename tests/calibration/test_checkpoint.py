"""calibration.checkpoint: compressed-tensors export of emulated groups, and our loader."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from calibration import checkpoint as ckpt
from calibration.checkpoint import (
    CheckpointError,
    build_quantization_config,
    load_checkpoint,
    remove_activation_quantization,
)
from calibration.emulate import EmulationError, quantize_groups
from calibration.groups import select_targets
from calibration.models import load_causal_lm
from calibration.precision import Tier
from kernels import dequantize_nvfp4
from tests.calibration.exports import export_all
from tests.conftest import assert_greedy_generation

QKV = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
GATE_UP = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return load_causal_lm(tiny_llama_dir, dtype="bf16")


def _amax(selection, seed: int = 0) -> dict[str, float]:
    """Per-group input amax values."""
    g = torch.Generator().manual_seed(seed)
    return {group.name: 1.0 + 4.0 * float(torch.rand(1, generator=g)) for group in selection.groups}


@pytest.fixture(scope="module")
def exported(tiny, tiny_llama_dir, tmp_path_factory):
    """W4A16 and W4A4 checkpoints of the tiny Llama."""
    root = tmp_path_factory.mktemp("export")
    selection = select_targets(tiny.model)
    amax = _amax(selection)
    w4a16 = export_all(tiny.model, root / "w4a16", source_dir=tiny_llama_dir)
    w4a4 = export_all(
        tiny.model,
        root / "w4a4",
        Tier.NVFP4,
        input_amax=amax,
        tokenizer=tiny.tokenizer,
        extra_files={"calibration.json": {"sample_size": 3}},
    )
    return {"w4a16": w4a16, "w4a4": w4a4, "amax": amax}


def _tensor_meta(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    meta = {}
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            t = f.get_tensor(key)
            meta[key] = (t.dtype, tuple(t.shape))
    return meta


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return ckpt._read_checkpoint_tensors(path)


def test_w4a16_layout_config_and_reload(exported, tiny):
    summary = exported["w4a16"]
    path = summary.out_dir
    meta = _tensor_meta(path)
    q = "model.layers.0.self_attn.q_proj"
    assert meta[f"{q}.weight_packed"] == (torch.uint8, (64, 32))
    assert meta[f"{q}.weight_scale"] == (torch.float8_e4m3fn, (64, 4))
    assert meta[f"{q}.weight_global_scale"] == (torch.float32, (1,))
    assert f"{q}.input_global_scale" not in meta and f"{q}.weight" not in meta
    assert meta["model.embed_tokens.weight"][0] == torch.bfloat16  # unquantized: model dtype
    assert "lm_head.weight" not in meta  # tied to embed_tokens, stored once
    assert len(summary.quantized_layers) == 14 and summary.group_count == 8
    assert dict(summary.skipped) == {"lm_head": "ignored by pattern"}
    assert pickle.loads(pickle.dumps(summary)) == summary  # can cross process/task boundaries
    assert summary.bytes_after < summary.bytes_before

    from compressed_tensors.quantization import QuantizationConfig

    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(raw)
    assert parsed.format == "nvfp4-pack-quantized" and raw["quant_method"] == "compressed-tensors"
    assert parsed.ignore == ["lm_head"]
    assert parsed.config_groups["group_0"].input_activations is None
    assert (path / "tokenizer.json").is_file() and (path / "generation_config.json").is_file()

    model, tokenizer, info = load_checkpoint(path)
    assert set(info.tiers.values()) == {Tier.NVFP4A16} and info.ignored_layers == ("lm_head",)
    stored = _tensors(path)
    expected = dequantize_nvfp4(
        stored[f"{q}.weight_packed"],
        stored[f"{q}.weight_scale"],
        stored[f"{q}.weight_global_scale"],
        dtype=torch.bfloat16,
    )
    assert torch.equal(model.get_submodule(q).weight, expected)
    assert torch.equal(model.lm_head.weight, tiny.model.lm_head.weight)
    assert_greedy_generation(model, tokenizer)


def test_fused_groups_share_global_scales(exported):
    stored = _tensors(exported["w4a4"].out_dir)
    for members in (QKV, GATE_UP):
        for suffix in ("weight_global_scale", "input_global_scale"):
            values = [stored[f"{m}.{suffix}"] for m in members]
            assert all(torch.equal(values[0], v) for v in values), (members, suffix)
        # the shared input scale comes from the group's calibrated amax
        group = "model.layers.0.self_attn.qkv" if members == QKV else "model.layers.0.mlp.gate_up"
        amax = exported["amax"][group]
        assert float(stored[f"{members[0]}.input_global_scale"]) == pytest.approx(448 * 6 / amax)
    # the weight global scale comes from the max amax over the members' weights
    q, k, v = (stored[f"{m}.weight_global_scale"] for m in QKV)
    assert torch.equal(q, k) and torch.equal(k, v)


def test_w4a4_config_extra_files_and_activation_quant(exported, tiny):
    path = exported["w4a4"].out_dir
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    assert raw["config_groups"]["group_0"]["input_activations"]["num_bits"] == 4
    assert json.loads((path / "calibration.json").read_text()) == {"sample_size": 3}
    model, tokenizer, info = load_checkpoint(path)
    assert set(info.tiers.values()) == {Tier.NVFP4} and info.quantizes_activations
    assert set(info.input_global_scales) == set(info.quantized_layers)
    w4a16_model, _, _ = load_checkpoint(exported["w4a16"].out_dir)
    # same weights as the W4A16 checkpoint; only the activation fake-quant differs
    for name, p in w4a16_model.state_dict().items():
        assert torch.equal(p, model.state_dict()[name]), name
    ids = tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a4 = model(ids).logits
        a16 = w4a16_model(ids).logits
    assert not torch.equal(a4, a16)
    assert remove_activation_quantization(model) == len(info.quantized_layers)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, a16)
    assert_greedy_generation(w4a16_model, tokenizer)


def test_names_dtypes_shapes_match_compressed_tensors_compressor(exported):
    """Compress the same tiny model with compressed-tensors' own NVFP4 compressor and compare."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    from tests.conftest import build_tiny_llama

    model = build_tiny_llama()
    selection = select_targets(model)
    quant_config = build_quantization_config(
        quantize_groups(model, selection.groups, Tier.NVFP4A16), ["lm_head"]
    )
    quant_config.config_groups["group_0"] = __import__(
        "compressed_tensors.quantization", fromlist=["preset_name_to_scheme"]
    ).preset_name_to_scheme("NVFP4", ["Linear"])
    apply_quantization_config(model, quant_config)
    with torch.no_grad():
        for _, module in model.named_modules():
            if not hasattr(module, "weight_global_scale"):
                continue
            w = module.weight.float()
            amax = w.abs().max().reshape(1)
            gs = generate_gparam(-amax, amax)
            module.weight_global_scale.copy_(gs)
            blocks = w.reshape(w.shape[0], -1, 16)
            scale, _ = calculate_qparams(
                blocks.amin(-1),
                blocks.amax(-1),
                module.quantization_scheme.weights,
                global_scale=gs,
            )
            module.weight_scale.data = scale.to(module.weight_scale.dtype)
            module.input_global_scale.fill_(448 * 6 / 3.0)
    ModelCompressor(quantization_config=quant_config).compress_model(model)
    theirs = {
        k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    ours = _tensor_meta(exported["w4a4"].out_dir)
    assert ours == theirs

    # A lone (unfused) layer has the same global scale in both: block scales agree byte for byte.
    stored = _tensors(exported["w4a4"].out_dir)
    ct_state = model.state_dict()
    o = "model.layers.0.self_attn.o_proj"
    assert torch.equal(stored[f"{o}.weight_global_scale"], ct_state[f"{o}.weight_global_scale"])
    assert torch.equal(
        stored[f"{o}.weight_scale"].view(torch.uint8),
        ct_state[f"{o}.weight_scale"].view(torch.uint8),
    )
    agree = (stored[f"{o}.weight_packed"] == ct_state[f"{o}.weight_packed"]).float().mean()
    assert agree >= 0.999


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
@pytest.mark.parametrize("which", ["w4a16", "w4a4"])
def test_transformers_compressed_tensors_integration_gets_our_weights(exported, which):
    """transformers' own compressed-tensors path (decompress) reads our checkpoint to the same
    weights as our loader. (It drops W4A4 activation quantization, which is why we have our own.)"""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    path = exported[which].out_dir
    # both libraries are pinned dependencies: a failure to load is a failure of this test
    hf = AutoModelForCausalLM.from_pretrained(
        str(path),
        quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.bfloat16,
        local_files_only=True,
    )
    ours, _, _ = load_checkpoint(path)
    theirs = hf.state_dict()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(theirs[name].to(tensor.dtype), tensor), name


def test_w4a4_needs_input_amax(tiny, tmp_path):
    with pytest.raises(EmulationError, match="input amax"):
        export_all(tiny.model, tmp_path / "a", Tier.NVFP4)
    with pytest.raises(EmulationError, match="finite and > 0"):
        export_all(
            tiny.model,
            tmp_path / "b",
            Tier.NVFP4,
            input_amax={g.name: 0.0 for g in select_targets(tiny.model).groups},
        )
    assert not any(tmp_path.iterdir())


def test_unaligned_layer_stays_unquantized_and_listed(tmp_path):
    from tests.conftest import build_tiny_llama

    model = build_tiny_llama(intermediate_size=120)  # down_proj in_features = 120, not 16k
    summary = export_all(model, tmp_path / "out")
    down = "model.layers.0.mlp.down_proj"
    assert "multiple of 16" in summary.skipped[down]
    assert down not in summary.quantized_layers and GATE_UP[0] in summary.quantized_layers
    raw = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert down in raw["ignore"] and "lm_head" in raw["ignore"]
    meta = _tensor_meta(tmp_path / "out")
    assert meta[f"{down}.weight"] == (torch.bfloat16, (64, 120))
    reloaded, _, info = load_checkpoint(tmp_path / "out")
    assert down in info.ignored_layers
    assert torch.equal(reloaded.get_submodule(down).weight, model.get_submodule(down).weight)


def test_bf16_tier_keeps_whole_fused_group(tiny, tmp_path):
    summary = export_all(tiny.model, tmp_path / "out", fallback={"model.layers.0.self_attn.qkv"})
    for member in QKV:
        assert summary.skipped[member] == "tier bf16" and member not in summary.tiers
    raw = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert set(QKV) <= set(raw["ignore"])
    assert summary.bytes_by_tier["bf16"] == (64 * 64 + 2 * 32 * 64) * 2  # q, k, v in bf16


def test_lm_head_is_never_quantized(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="lm_head"):
        export_all(tiny.model, tmp_path / "out", ignore=())


def test_failed_write_leaves_nothing(tiny, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "_write_config", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        export_all(tiny.model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_refused_then_replaced_atomically(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_all(tiny.model, out)
    assert (out / "keep.txt").read_text() == "previous"

    # a failure during an overwrite keeps the previous folder intact
    monkeypatch.setattr(ckpt, "_write_config", lambda *a, **k: (_ for _ in ()).throw(OSError("x")))
    with pytest.raises(OSError):
        export_all(tiny.model, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "previous"
    monkeypatch.undo()

    export_all(tiny.model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp or backup dirs left


def test_sharded_export_reloads_identically(exported, tiny, tmp_path):
    summary = export_all(tiny.model, tmp_path / "sharded", max_shard_size=40_000)
    assert summary.shard_count > 1
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == summary.shard_count
    sharded, _, _ = load_checkpoint(tmp_path / "sharded")
    single, _, _ = load_checkpoint(exported["w4a16"].out_dir)
    for name, tensor in single.state_dict().items():
        assert torch.equal(sharded.state_dict()[name], tensor), name


def test_extra_files_cannot_clobber_checkpoint_files(tiny, tmp_path):
    for bad in ("config.json", "../x.json", "notes.txt"):
        with pytest.raises(CheckpointError, match="extra file"):
            export_all(tiny.model, tmp_path / "out", extra_files={bad: {}})
