"""calibration.moe: routed experts as per-expert groups, calibrated per expert, emulated, exported in the
per-expert layout vLLM loads and reloaded with the same numerics (tiny random Mixtral / Qwen-MoE)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from calibration import moe
from calibration.checkpoint import (
    CheckpointError,
    _read_checkpoint_tensors,
    export_checkpoint,
    load_checkpoint,
    remove_activation_quantization,
)
from calibration.emulate import emulate, quantize_groups
from calibration.groups import GroupKind, matches_any, select_targets
from calibration.observers import ActivationStats, collect_activation_stats, tokenize_batches
from calibration.precision import DEFAULT_IGNORE, ExpertInputScale, Tier
from calibration.sensitivity import _forward_logits
from calibration.tiers import group_tier_bytes
from tests.calibration._tiny_models import (
    PROMPTS,
    char_tokenizer,
    tiny_mixtral,
    tiny_qwen2_moe,
    tiny_qwen3_moe,
)

BUILDERS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe}
#: Per-expert checkpoint leaves (gate, up, down) and the experts prefix vLLM's FusedMoE layer gets.
LEAVES = {
    "mixtral": ("w1", "w3", "w2"),
    "qwen2_moe": ("gate_proj", "up_proj", "down_proj"),
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
}
PREFIX = {
    "mixtral": "model.layers.{}.block_sparse_moe.experts",
    "qwen2_moe": "model.layers.{}.mlp.experts",
    "qwen3_moe": "model.layers.{}.mlp.experts",
}


@pytest.fixture(scope="module")
def batches():
    return tokenize_batches(char_tokenizer(), PROMPTS, max_length=24, batch_size=4)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def calibrated(request, batches):
    """(family, model, selection, stats) with the default (layer) input-scale policy."""
    model = BUILDERS[request.param](seed=3)
    selection = select_targets(model)
    stats = collect_activation_stats(model, batches, selection, progress=False)
    return request.param, model, selection, stats


# ------------------------------------------------------------------------------------------ targets


@pytest.mark.parametrize(
    "family, build",
    [("mixtral", tiny_mixtral), ("qwen2_moe", tiny_qwen2_moe), ("qwen3_moe", tiny_qwen3_moe)],
)
def test_experts_are_per_expert_groups_and_routers_are_skipped(family, build):
    model = build(num_layers=1)
    selection = select_targets(model)
    gate, up, down = LEAVES[family]
    prefix = PREFIX[family].format(0)
    experts = [g for g in selection.groups if g.expert_slots]
    assert len(experts) == 2 * 4  # gate_up + down per expert, 4 experts
    for e in range(4):
        gate_up = selection.group_of(f"{prefix}.{e}.{gate}")
        assert gate_up.name == f"{prefix}.{e}.gate_up"
        assert gate_up.members == (f"{prefix}.{e}.{gate}", f"{prefix}.{e}.{up}")
        assert gate_up.kind is GroupKind.EXPERT_GATE_UP and gate_up.block_index == 0
        assert gate_up.in_features == 64 and gate_up.num_params == 2 * 32 * 64
        down_group = selection.group_of(f"{prefix}.{e}.{down}")
        assert down_group.members == (f"{prefix}.{e}.{down}",)
        assert down_group.kind is GroupKind.EXPERT_DOWN and down_group.in_features == 32
        assert {gate_up.tier_unit, down_group.tier_unit} == {"model.layers.0.mlp.experts"}
        # each member's slot is the slice transformers' forward multiplies with
        fused = model.model.layers[0].mlp.experts
        views = moe.expert_weights(model, gate_up)
        assert torch.equal(views[gate_up.members[0]], fused.gate_up_proj[e, :32])
        assert torch.equal(views[gate_up.members[1]], fused.gate_up_proj[e, 32:])
        (down_view,) = moe.expert_weights(model, down_group).values()
        assert torch.equal(down_view, fused.down_proj[e])
    router = (
        "model.layers.0.block_sparse_moe.gate" if family == "mixtral" else "model.layers.0.mlp.gate"
    )
    assert selection.skipped[router] == "MoE router: never quantized"
    assert not any("gate." in m or m.endswith(".gate") for m in selection.quantized_layers)
    # attention stays an ordinary fused group
    assert selection.groups[0].name == "model.layers.0.self_attn.qkv"
    if family == "qwen2_moe":  # the shared expert is an ordinary MLP; its sigmoid gate a router
        shared = selection.group_of("model.layers.0.mlp.shared_expert.up_proj")
        assert shared.kind is GroupKind.MLP_GATE_UP and not shared.expert_slots
        assert selection.skipped["model.layers.0.mlp.shared_expert_gate"] == "ignored by pattern"


def test_default_ignore_covers_routers_under_model_and_checkpoint_names():
    for name in (
        "model.layers.3.mlp.gate",  # Mixtral / Qwen-MoE router in transformers 5
        "model.layers.3.block_sparse_moe.gate",  # Mixtral router on disk
        "model.layers.3.mlp.shared_expert_gate",  # Qwen2-MoE shared-expert gate (an nn.Linear)
    ):
        assert matches_any(name, DEFAULT_IGNORE), name
    for name in ("model.layers.3.mlp.gate_proj", "model.layers.3.mlp.shared_expert.gate_proj"):
        assert not matches_any(name, DEFAULT_IGNORE), name


def test_an_ignored_expert_keeps_its_whole_moe_layer_high_precision():
    model = tiny_mixtral(num_layers=2)
    member = "model.layers.1.block_sparse_moe.experts.2.w2"
    selection = select_targets(model, (*DEFAULT_IGNORE, member))
    assert all(g.block_index == 0 for g in selection.groups if g.expert_slots)
    assert selection.skipped[member] == "ignored by pattern"
    assert (
        "one scheme per layer" in selection.skipped["model.layers.1.block_sparse_moe.experts.0.w1"]
    )


def test_experts_only_preset():
    selection = select_targets(tiny_qwen2_moe(num_layers=1))
    preset = moe.experts_only_preset(selection, Tier.NVFP4)
    experts = {g.name for g in selection.groups if g.expert_slots}
    assert preset.decided == experts
    assert {preset.tiers[n] for n in experts} == {Tier.NVFP4}
    candidates = set(preset.candidates)
    assert candidates == {g.name for g in selection.groups} - experts
    assert {
        "model.layers.0.self_attn.qkv",
        "model.layers.0.mlp.shared_expert.gate_up",
    } <= candidates
    assert {preset.tiers[n] for n in candidates} == {Tier.BF16}
    assert not any(n.rsplit(".", 1)[-1] == "gate" for n in preset.tiers)  # routers are no groups
    with pytest.raises(ValueError, match="needs MoE"):
        moe.experts_only_preset(select_targets(_dense()), Tier.NVFP4)
    with pytest.raises(ValueError, match="quantizes the routed experts"):
        moe.experts_only_preset(selection, Tier.BF16)


def _dense():
    from tests.calibration._tiny_models import tiny_llama

    return tiny_llama(num_layers=1)


# ------------------------------------------------------------------------------------------ statistics


@torch.no_grad()
def _reference_expert_amax(model, batches):
    """Independent oracle: route each real token with the router module itself and compute every
    expert's gate/up and down inputs directly from the fused weights (no experts forward involved)."""
    amax: dict[tuple[int, int, str], float] = {}
    tokens: dict[tuple[int, int], int] = {}
    block_amax: dict[int, float] = {}
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        for batch in batches:
            captured.clear()
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            real = batch.attention_mask.bool().reshape(-1)
            for i, layer in enumerate(model.model.layers):
                x = captured[i][real]
                block_amax[i] = max(block_amax.get(i, 0.0), float(x.abs().max()))
                _, _, top_k_index = layer.mlp.gate(x)
                experts = layer.mlp.experts
                for e in range(experts.gate_up_proj.shape[0]):
                    rows = (top_k_index == e).any(dim=-1)
                    tokens[(i, e)] = tokens.get((i, e), 0) + int(rows.sum())
                    if not rows.any():
                        continue
                    xe = x[rows]
                    gate, up = F.linear(xe, experts.gate_up_proj[e]).chunk(2, dim=-1)
                    h = experts.act_fn(gate) * up
                    for proj, value in (("gate_up", xe), ("down", h)):
                        key = (i, e, proj)
                        amax[key] = max(amax.get(key, 0.0), float(value.abs().max()))
    finally:
        for handle in handles:
            handle.remove()
    return amax, tokens, block_amax


def _starve_expert(model, starved: int) -> None:
    """Router rows (+a, -a, +b, -b, 0): every token's two largest logits are |a.x| and |b.x| (> 0), so
    expert ``starved`` (logit 0) is never among the top 2."""
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            a, b = torch.randn(2, w.shape[1]) * 0.5
            rows = [a, -a, b, -b]
            for e in range(w.shape[0]):
                w[e] = 0.0 if e == starved else rows.pop(0)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_per_expert_amax_and_a_starved_expert_falls_back(family, batches):
    model = BUILDERS[family](num_experts=5, seed=1)
    _starve_expert(model, starved=4)
    selection = select_targets(model)
    stats = collect_activation_stats(
        model, batches, selection, progress=False, expert_input_scale=ExpertInputScale.EXPERT
    )
    reference, tokens, block_amax = _reference_expert_amax(model, batches)
    gate, _, down = LEAVES[family]
    experts = stats.experts
    assert experts is not None and experts.policy is ExpertInputScale.EXPERT
    for i in range(2):
        prefix = PREFIX[family].format(i)
        assert experts.block_input_amax[f"model.layers.{i}.mlp.experts"] == pytest.approx(
            block_amax[i], rel=1e-6
        )
        for e in range(4):
            gate_up, down_name = f"{prefix}.{e}.gate_up", f"{prefix}.{e}.{down}"
            assert tokens[(i, e)] > 0
            assert experts.routed_tokens[gate_up] == tokens[(i, e)]
            assert stats.group_input_amax[gate_up] == pytest.approx(reference[(i, e, "gate_up")])
            assert stats.group_input_amax[down_name] == pytest.approx(reference[(i, e, "down")])
        starved_gu, starved_down = f"{prefix}.4.gate_up", f"{prefix}.4.{down}"
        assert tokens[(i, 4)] == 0 and experts.routed_tokens[starved_gu] == 0
        assert experts.observed_amax[starved_gu] == 0.0
        # fallback: gate/up reads the MoE block input; down: max over the experts that saw tokens
        assert stats.group_input_amax[starved_gu] == pytest.approx(block_amax[i], rel=1e-6)
        assert stats.group_input_amax[starved_down] == pytest.approx(
            max(reference[(i, e, "down")] for e in range(4))
        )
        assert "no calibration token" in experts.fallbacks[starved_gu]
        assert starved_down in experts.fallbacks
    assert experts.fallback_count == 4  # 2 layers x (gate_up, down) of the starved expert
    assert all(0 < v < float("inf") for v in stats.group_input_amax.values())
    assert stats.member_to_group[f"{PREFIX[family].format(0)}.4.{gate}"].endswith("4.gate_up")

    # the layer policy (default): one amax per layer and projection, the max over its experts
    layer = collect_activation_stats(model, batches, selection, progress=False)
    for i in range(2):
        prefix = PREFIX[family].format(i)
        gu = {layer.group_input_amax[f"{prefix}.{e}.gate_up"] for e in range(5)}
        dn = {layer.group_input_amax[f"{prefix}.{e}.{down}"] for e in range(5)}
        assert gu == {max(stats.group_input_amax[f"{prefix}.{e}.gate_up"] for e in range(5))}
        assert dn == {max(stats.group_input_amax[f"{prefix}.{e}.{down}"] for e in range(5))}
    assert layer.experts.fallback_count == 4
    assert ActivationStats.from_json(layer.to_json()) == layer


def test_resolve_refuses_a_layer_that_saw_nothing():
    selection = select_targets(tiny_mixtral(num_layers=1))
    groups = [g for g in selection.groups if g.expert_slots]
    observer = moe.ExpertInputObserver.__new__(moe.ExpertInputObserver)
    observer.amax, observer.tokens = {}, {}
    observer.block_amax = {"model.layers.0.mlp.experts": 0.0}
    with pytest.raises(ValueError, match="no non-zero calibration input"):
        moe.resolve_expert_input_amax(groups, observer)
    observer.block_amax = {"model.layers.0.mlp.experts": 2.5}
    with pytest.raises(ValueError, match="down_proj"):  # gate/up can fall back, down cannot
        moe.resolve_expert_input_amax(groups, observer)


def test_w4a4_expert_scales_are_finite_and_fused_as_vllm_needs(batches, tmp_path):
    model = tiny_mixtral(num_experts=5, seed=2)
    _starve_expert(model, starved=4)
    selection = select_targets(model)
    stats = collect_activation_stats(model, batches, selection, progress=False)
    planned = quantize_groups(model, selection.groups, Tier.NVFP4, stats.group_input_amax)
    export_checkpoint(model, tmp_path / "ckpt", planned)
    tensors = _read_checkpoint_tensors(tmp_path / "ckpt")
    for i in range(2):
        prefix = PREFIX["mixtral"].format(i)
        w13_input = set()
        for e in range(5):
            w1, w3 = (f"{prefix}.{e}.{leaf}" for leaf in ("w1", "w3"))
            # vLLM keeps w13_weight_global_scale[:, 0] and needs w1 == w3 (and one input scale)
            for suffix in ("weight_global_scale", "input_global_scale"):
                assert torch.equal(tensors[f"{w1}.{suffix}"], tensors[f"{w3}.{suffix}"])
            w13_input.add(float(tensors[f"{w1}.input_global_scale"]))
        assert (
            len(w13_input) == 1
        )  # layer policy: FlashInfer's max over experts, the same everywhere
    scales = [t for k, t in tensors.items() if k.endswith("global_scale")]
    assert scales and all(bool(torch.isfinite(t).all() and (t > 0).all()) for t in scales)


# ------------------------------------------------------------------------------------------ export / load


def test_export_layout_is_what_save_pretrained_and_vllm_use(tmp_path):
    """BF16 experts are written exactly as transformers' save_pretrained writes them; quantized experts
    replace each per-expert ``.weight`` by compressed-tensors' NVFP4 tensors with vLLM's shapes."""
    model = tiny_mixtral(num_layers=2)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    hf_keys = set(_read_checkpoint_tensors(tmp_path / "hf"))
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in hf_keys  # the on-disk layout
    selection = select_targets(model)
    tiers = {
        g.name: Tier.NVFP4A16 if (g.block_index == 0 or not g.expert_slots) else Tier.BF16
        for g in selection.groups
    }
    export_checkpoint(model, tmp_path / "ckpt", quantize_groups(model, selection.groups, tiers))
    meta = {
        k: (t.dtype, tuple(t.shape)) for k, t in _read_checkpoint_tensors(tmp_path / "ckpt").items()
    }
    quantized_layers = {k.rpartition(".")[0] for k in meta if k.endswith("weight_packed")} | {
        k.rpartition(".")[0] for k in hf_keys if ".layers.0.block_sparse_moe.experts." in k
    }
    expected = {k for k in hf_keys if k.rpartition(".")[0] not in quantized_layers}
    assert {k for k in meta if k.rpartition(".")[0] not in quantized_layers} == expected
    for e in range(4):
        prefix = f"{PREFIX['mixtral'].format(0)}.{e}"
        for leaf, out_features, in_features in (("w1", 32, 64), ("w3", 32, 64), ("w2", 64, 32)):
            name = f"{prefix}.{leaf}"
            assert meta[f"{name}.weight_packed"] == (torch.uint8, (out_features, in_features // 2))
            assert meta[f"{name}.weight_scale"] == (
                torch.float8_e4m3fn,
                (out_features, in_features // 16),
            )
            assert meta[f"{name}.weight_global_scale"] == (torch.float32, (1,))
            assert f"{name}.weight" not in meta and f"{name}.input_global_scale" not in meta
        assert meta[f"{PREFIX['mixtral'].format(1)}.{e}.w1.weight"] == (torch.bfloat16, (32, 64))
    assert "model.layers.0.block_sparse_moe.gate.weight" in meta  # router: renamed as saved, bf16
    assert not any(".mlp." in k for k in meta)  # nothing under the model-only names


def _fused_lookup_names(prefix: str) -> list[str]:
    """The names vLLM's CompressedTensorsMoEMethod.get_moe_method matches a FusedMoE layer by."""
    return [f"{prefix}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]


def _matches(name: str, entries) -> bool:
    return any(
        re.match(t[3:], name) if t.startswith("re:") else t == name for t in entries
    )  # vLLM's check_equal_or_regex_match


def test_mixed_precision_config_targets_moe_layers_as_vllm_looks_them_up(tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model = tiny_mixtral(num_layers=2)
    selection = select_targets(model)
    amax = {g.name: 2.0 for g in selection.groups}
    tiers = {
        g.name: (Tier.NVFP4A16 if g.block_index == 0 else Tier.BF16)
        if g.expert_slots
        else Tier.NVFP4
        for g in selection.groups
    }
    export_checkpoint(
        model, tmp_path / "ckpt", quantize_groups(model, selection.groups, tiers, amax)
    )
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    QuantizationConfig.model_validate(config)
    assert CompressedTensorsConfig.from_dict(config).quantization_config.format == "mixed-precision"
    schemes = {
        ("a4" if group["input_activations"] else "a16"): group["targets"]
        for group in config["config_groups"].values()
    }
    layer0, layer1 = PREFIX["mixtral"].format(0), PREFIX["mixtral"].format(1)
    for name in _fused_lookup_names(layer0) + [f"{layer0}.3.w3"]:
        assert _matches(name, schemes["a16"]) and not _matches(name, schemes["a4"]), name
        assert not _matches(name, config["ignore"]), name
    for name in _fused_lookup_names(layer1) + [f"{layer1}.2.w1"]:
        assert _matches(name, config["ignore"]), name
    assert "model.layers.0.block_sparse_moe.gate" in config["ignore"]
    assert not _matches("model.layers.0.block_sparse_moe.gate", schemes["a16"] + schemes["a4"])
    assert "model.layers.0.self_attn.q_proj" in schemes["a4"]


def test_export_refuses_two_tiers_in_one_moe_layer(tmp_path):
    model = tiny_qwen2_moe(num_layers=1)
    selection = select_targets(model)
    down = "model.layers.0.mlp.experts.1.down_proj"
    tiers = {g.name: Tier.BF16 if g.name == down else Tier.NVFP4A16 for g in selection.groups}
    planned = quantize_groups(model, selection.groups, tiers)
    with pytest.raises(CheckpointError, match="one scheme"):
        export_checkpoint(model, tmp_path / "a", planned)
    partial = [g for g in planned if g.group.name != down]  # a missing expert group: same refusal
    with pytest.raises(CheckpointError, match="one scheme"):
        export_checkpoint(model, tmp_path / "b", partial)


@pytest.mark.parametrize("tier", [Tier.NVFP4, Tier.NVFP4A16, Tier.FP8])
def test_plan_emulation_equals_reloaded_checkpoint_bit_for_bit(calibrated, batches, tier, tmp_path):
    family, model, selection, stats = calibrated
    # a plan: every expert at ``tier``, attention alternating tier / BF16, shared experts at tier
    tiers = {
        g.name: Tier.BF16 if (g.kind is GroupKind.ATTENTION_OUT and g.block_index == 1) else tier
        for g in selection.groups
    }
    planned = quantize_groups(model, selection.groups, tiers, stats.group_input_amax)
    with emulate(model, planned, storage_dtype=torch.bfloat16), torch.no_grad():
        emulated = [_forward_logits(model, b) for b in batches]
    summary = export_checkpoint(model, tmp_path / "ckpt", planned, tokenizer=char_tokenizer())
    reloaded, _, info = load_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    gate = LEAVES[family][0]
    assert info.tiers[f"{PREFIX[family].format(1)}.3.{gate}"] is tier
    assert set(info.tiers) == set(summary.tiers)
    with torch.no_grad():
        for batch, expected in zip(batches, emulated, strict=True):
            assert torch.equal(_forward_logits(reloaded, batch), expected)
        # the oracle can fail: unquantized, or quantized without the storage rounding, differ
        assert not torch.equal(_forward_logits(model, batches[0]), emulated[0])
        with emulate(model, planned):
            assert not torch.equal(_forward_logits(model, batches[0]), emulated[0])
        if tier.quantizes_activations:  # the expert input fake-quant is part of what reloads
            experts_a16 = quantize_groups(
                model,
                selection.groups,
                {
                    g.name: Tier.NVFP4A16 if g.expert_slots else tiers[g.name]
                    for g in selection.groups
                },
                stats.group_input_amax,
            )
            with emulate(model, experts_a16, storage_dtype=torch.bfloat16):
                assert not torch.equal(_forward_logits(model, batches[0]), emulated[0])
            remove_activation_quantization(reloaded)
            assert not torch.equal(_forward_logits(reloaded, batches[0]), emulated[0])


@pytest.mark.parametrize("storage_dtype", [None, torch.bfloat16])
def test_expert_emulation_undoes_everything(calibrated, batches, storage_dtype):
    _, model, selection, stats = calibrated
    experts = model.model.layers[0].mlp.experts
    forward_before = experts.forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = _forward_logits(model, batches[0])
    one_expert = [g for g in selection.groups if g.expert_slots][:2]  # expert 0 of layer 0 alone
    planned = quantize_groups(model, one_expert, Tier.NVFP4, stats.group_input_amax)
    with emulate(model, planned, storage_dtype=storage_dtype) as handle, torch.no_grad():
        assert set(handle.layers) == {m for g in one_expert for m in g.members}
        assert "forward" in experts.__dict__  # the per-expert loop runs while W4A4 is emulated
        assert not torch.equal(_forward_logits(model, batches[0]), reference)
    assert "forward" not in experts.__dict__ and experts.forward == forward_before
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():
        assert torch.equal(_forward_logits(model, batches[0]), reference)


def test_looped_forward_matches_transformers_eager_forward(batches):
    """With a hook that changes nothing, the patched experts forward computes what transformers' eager
    implementation computes (same loop, same ops)."""
    model = tiny_mixtral(seed=5)
    model.config._experts_implementation = "eager"
    with torch.no_grad():
        eager = _forward_logits(model, batches[0])
    handles = [
        moe.register_expert_input_hook(layer.mlp.experts, lambda *_: None)
        for layer in model.model.layers
    ]
    with torch.no_grad():
        looped = _forward_logits(model, batches[0])
    for handle in handles:
        handle.remove()
    assert torch.equal(looped, eager)


def test_loader_refuses_a_checkpoint_missing_an_expert(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_mixtral(num_layers=1)
    selection = select_targets(model)
    export_checkpoint(
        model, tmp_path / "ckpt", quantize_groups(model, selection.groups, Tier.NVFP4A16)
    )
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    for key in [k for k in tensors if ".experts.2.w2." in k]:
        del tensors[key]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="per-expert tensors missing"):
        load_checkpoint(tmp_path / "ckpt")


def test_an_upgrade_takes_its_whole_moe_layer_along():
    """vLLM serves one scheme per MoE layer: the planner sees a layer's routed experts as one unit,
    so a hot expert over the floor moves every expert of its layer, and a budget counts them all."""
    from calibration.config import CalibrationConfig
    from calibration.recalibrate import tier_options
    from calibration.tiers import plan_tiers

    selection = select_targets(tiny_mixtral(num_layers=2))
    hot = "model.layers.1.block_sparse_moe.experts.2.w2"
    qkv = "model.layers.0.self_attn.qkv"
    scores = {
        g.name: {Tier.NVFP4: 0.2 if g.name in (hot, qkv) else 0.001, Tier.FP8: 0.0001}
        for g in selection.groups
    }
    exact = {hot: 0.2, qkv: 0.2}
    config = CalibrationConfig(upgrade_tiers=("bf16",))
    options = tier_options(selection, scores, exact, config)
    layer1 = [g for g in selection.groups if g.tier_unit == "model.layers.1.mlp.experts"]
    assert len(layer1) > 2
    by_unit = {o.group: o for o in options}
    unit = by_unit["model.layers.1.mlp.experts"]
    assert (
        unit.base.bytes == sum(group_tier_bytes(g, Tier.NVFP4) for g in layer1)
        and unit.exact_kl is None
    )  # only one of its groups was measured
    plan = plan_tiers(options, max_extra_bytes=0.0, kl_threshold=0.05)
    assert plan.tiers[qkv] is Tier.BF16  # the floor, whatever the budget
    assert plan.tiers["model.layers.1.mlp.experts"] is Tier.NVFP4  # not measured whole: no floor
    exact_layer = {g.name: 0.2 / len(layer1) + 0.01 for g in layer1} | {qkv: 0.2}
    options = tier_options(selection, scores, exact_layer, config)
    plan = plan_tiers(options, max_extra_bytes=0.0, kl_threshold=0.05)
    assert plan.tiers["model.layers.1.mlp.experts"] is Tier.BF16


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_a_model_loaded_from_its_checkpoint_has_the_same_layout(family, tmp_path):
    """from_pretrained records the conversions it applied; the layout must come out the same."""
    from calibration.models import load_causal_lm

    model = BUILDERS[family](num_layers=1)
    model.save_pretrained(tmp_path / "src")
    char_tokenizer().save_pretrained(tmp_path / "src")
    loaded = load_causal_lm(tmp_path / "src", dtype="fp32").model
    fresh, reloaded = moe.checkpoint_layout(model), moe.checkpoint_layout(loaded)
    assert [layer.slots for layer in reloaded.moe_layers] == [
        layer.slots for layer in fresh.moe_layers
    ]
    assert dict(reloaded.names) == dict(fresh.names)
    assert [g.name for g in select_targets(loaded).groups] == [
        g.name for g in select_targets(model).groups
    ]


def test_fp8_experts_are_written_per_channel_as_vllm_loads_them(tmp_path):
    """W8A8 experts: per expert FP8 ``weight`` [out, in] and FP32 ``weight_scale`` [out, 1] (vLLM's
    CompressedTensorsW8A8Fp8MoEMethod, channel strategy: w13_weight_scale [E, 2I, 1]); inputs dynamic."""
    model = tiny_qwen2_moe(num_layers=1)
    selection = select_targets(model)
    export_checkpoint(model, tmp_path / "ckpt", quantize_groups(model, selection.groups, Tier.FP8))
    tensors = _read_checkpoint_tensors(tmp_path / "ckpt")
    for leaf, shape in (("gate_proj", (32, 64)), ("up_proj", (32, 64)), ("down_proj", (64, 32))):
        name = f"model.layers.0.mlp.experts.3.{leaf}"
        assert tensors[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert tuple(tensors[f"{name}.weight"].shape) == shape
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
        assert tuple(tensors[f"{name}.weight_scale"].shape) == (shape[0], 1)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["dynamic"] is True
    assert group["input_activations"]["strategy"] == "token"
