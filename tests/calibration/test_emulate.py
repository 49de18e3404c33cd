"""calibration.emulate: one emulation for the sweep, the plan, the export and the reloaded checkpoint."""

from __future__ import annotations

import pytest
import torch

from calibration.checkpoint import export_checkpoint, load_checkpoint
from calibration.emulate import EmulationError, emulate, quantize_groups
from calibration.groups import select_targets
from calibration.observers import collect_activation_stats, tokenize_batches
from calibration.precision import NVFP4_BLOCK, Tier
from calibration.sensitivity import _forward_logits
from kernels import FP4_BLOCK_SIZE
from tests.calibration._tiny_models import PROMPTS, char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def setup():
    """An fp32 model whose weights are NOT bf16-representable, its calibration stats and a plan
    mixing every tier."""
    model = tiny_llama(num_layers=2, seed=3)
    tokenizer = char_tokenizer()
    selection = select_targets(model)
    batches = tokenize_batches(tokenizer, PROMPTS, max_length=24, batch_size=4)
    stats = collect_activation_stats(model, batches, selection, progress=False)
    cycle = [Tier.NVFP4, Tier.NVFP4A16, Tier.BF16, Tier.FP8]
    tiers = {g.name: cycle[i % len(cycle)] for i, g in enumerate(selection.groups)}
    return model, tokenizer, selection, stats, batches, tiers


def test_block_size_constant_matches_kernels():
    assert NVFP4_BLOCK == FP4_BLOCK_SIZE


def test_plan_emulation_equals_reloaded_checkpoint_bit_for_bit(setup, tmp_path):
    model, tokenizer, selection, stats, batches, tiers = setup
    assert set(tiers.values()) == set(Tier)
    planned = quantize_groups(model, selection.groups, tiers, stats.group_input_amax)
    with emulate(model, planned, storage_dtype=torch.bfloat16), torch.no_grad():
        emulated = [_forward_logits(model, b) for b in batches]
    export_checkpoint(model, tmp_path / "ckpt", planned, tokenizer=tokenizer)
    reloaded, _, info = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    assert set(info.tiers.values()) == {Tier.NVFP4, Tier.NVFP4A16, Tier.FP8}
    with torch.no_grad():
        for batch, expected in zip(batches, emulated, strict=True):
            assert torch.equal(_forward_logits(reloaded, batch), expected)
    # without the storage rounding the fp32 model computes something else (the oracle can fail)
    with emulate(model, planned), torch.no_grad():
        assert not torch.equal(_forward_logits(model, batches[0]), emulated[0])


def test_emulation_undoes_everything(setup):
    model, _, selection, stats, batches, tiers = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = _forward_logits(model, batches[0])
    planned = quantize_groups(model, selection.groups, tiers, stats.group_input_amax)
    with emulate(model, planned, storage_dtype=torch.bfloat16) as handle, torch.no_grad():
        assert handle.active
        assert len(handle.layers) == sum(len(g.members) for g in planned if g.tier is not Tier.BF16)
        assert not torch.equal(_forward_logits(model, batches[0]), reference)
    assert not handle.active
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert torch.equal(_forward_logits(model, batches[0]), reference)


def test_bf16_exact_originals_are_kept_compact_and_restored_bit_for_bit(setup):
    """A bf16 checkpoint computed in float32: emulation keeps the originals in bf16 (half the
    memory) and restores the float32 values exactly; storage rounding that changes nothing is
    skipped."""
    _, _, _, _, batches, tiers = setup
    model = tiny_llama(num_layers=2, seed=3)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(torch.bfloat16).float())
    selection = select_targets(model)
    stats = collect_activation_stats(model, batches, selection, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    planned = quantize_groups(model, selection.groups, tiers, stats.group_input_amax)
    with emulate(model, planned, storage_dtype=torch.bfloat16) as handle:
        kept = [original.dtype for _, original, _ in handle._saved]
        assert kept and set(kept) == {torch.bfloat16}
        assert len(kept) == len(handle.layers)  # only the quantized weights were replaced
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == before[name].dtype, name
        assert torch.equal(tensor, before[name]), name


def test_decoding_per_call_computes_the_same_bits_and_undoes_everything(setup):
    model, _, selection, stats, batches, tiers = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    planned = quantize_groups(model, selection.groups, tiers, stats.group_input_amax)
    with emulate(model, planned, storage_dtype=torch.bfloat16), torch.no_grad():
        once = [_forward_logits(model, b) for b in batches]
    with emulate(model, planned, storage_dtype=torch.bfloat16, decode_per_call=True) as handle:
        with torch.no_grad():
            per_call = [_forward_logits(model, b) for b in batches]
        # between calls the quantized members hold their own weights, not decoded copies
        state = model.state_dict()
        assert handle.layers
        for layer in handle.layers:
            assert torch.equal(state[f"{layer}.weight"], before[f"{layer}.weight"]), layer
    for a, b in zip(once, per_call, strict=True):
        assert torch.equal(a, b)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_w4a4_changes_only_through_input_quantization(setup):
    model, _, selection, stats, batches, _ = setup
    group = selection.groups[0]
    w4a16 = quantize_groups(model, [group], Tier.NVFP4A16)
    w4a4 = quantize_groups(model, [group], Tier.NVFP4, stats.group_input_amax)
    a, b = w4a16[0].members[0], w4a4[0].members[0]
    for key in ("weight_packed", "weight_scale", "weight_global_scale"):
        assert torch.equal(a.tensors[key], b.tensors[key])
    assert float(b.tensors["input_global_scale"]) == pytest.approx(
        448 * 6 / stats.group_input_amax[group.name]
    )
    with torch.no_grad():
        with emulate(model, w4a16):
            weights_only = _forward_logits(model, batches[0])
        with emulate(model, w4a4):
            full = _forward_logits(model, batches[0])
    assert not torch.equal(weights_only, full)


def test_fused_members_share_scales_and_bytes_match_the_tier(setup):
    model, _, selection, stats, _, _ = setup
    qkv = next(g for g in selection.groups if g.name.endswith("qkv"))
    (quantized,) = quantize_groups(model, [qkv], Tier.NVFP4, stats.group_input_amax)
    scales = {float(m.tensors["weight_global_scale"]) for m in quantized.members}
    assert len(scales) == 1
    linears = dict(model.named_modules())
    expected = sum(Tier.NVFP4.weight_bytes(*linears[m].weight.shape) for m in qkv.members)
    assert quantized.weight_bytes == expected


def test_w4a4_without_amax_is_refused(setup):
    model, _, selection, _, _, _ = setup
    with pytest.raises(EmulationError, match="input amax"):
        quantize_groups(model, selection.groups[:1], Tier.NVFP4)


def test_mixed_precision_checkpoint_round_trips_through_compressed_tensors(setup, tmp_path):
    """One checkpoint, one config group per tier (format mixed-precision): compressed-tensors' config
    model validates it, matches every layer to its tier's scheme on a model built by transformers from
    the checkpoint's config, and its own compressor for that scheme's format decompresses each layer
    to the weight our loader gives. (transformers 5.24's own dequantizing loader applies ONE scheme to
    every dense layer, ``get_dense_scheme`` in transformers/integrations/compressed_tensors.py, so it
    cannot read mixed dense tiers; single-tier checkpoints go through it in test_checkpoint.py.)"""
    import json

    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    from calibration.checkpoint import _read_checkpoint_tensors

    model, tokenizer, selection, stats, _, tiers = setup
    planned = quantize_groups(model, selection.groups, tiers, stats.group_input_amax)
    path = tmp_path / "mixed"
    export_checkpoint(model, path, planned, tokenizer=tokenizer)
    raw = json.loads((path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(raw)
    assert parsed.format == "mixed-precision"
    formats = sorted(str(s.format) for s in parsed.config_groups.values())
    assert formats == ["float-quantized", "nvfp4-pack-quantized", "nvfp4-pack-quantized"]
    bf16 = [m for g in planned if g.tier is Tier.BF16 for m in g.group.members]
    assert set(bf16) <= set(parsed.ignore)

    config = AutoConfig.from_pretrained(str(path))
    del config.quantization_config
    skeleton = AutoModelForCausalLM.from_config(config)
    apply_quantization_config(skeleton, parsed)
    ours, _, info = load_checkpoint(path)  # bf16, the dtype compressed-tensors decompresses to
    stored = _read_checkpoint_tensors(path)
    for layer, tier in info.tiers.items():
        scheme = skeleton.get_submodule(layer).quantization_scheme
        assert str(scheme.format) == tier.format, layer
        assert (scheme.input_activations is not None) == tier.quantizes_activations, layer
        own = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.rsplit(".", 1)[0] == layer}
        decompressed = BaseCompressor.get_value_from_registry(scheme.format).decompress(own, scheme)
        ours_w = ours.get_submodule(layer).weight
        assert torch.equal(decompressed["weight"].to(ours_w.dtype), ours_w), (layer, tier)
    assert all(not hasattr(skeleton.get_submodule(m), "quantization_scheme") for m in bf16)
