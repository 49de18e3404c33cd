import pytest
import torch
from torch import nn

from calibration.groups import DEFAULT_IGNORE, GroupKind, matches_any, select_targets


class _Attn(nn.Module):
    def __init__(self, hidden: int, kv: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)


class _Mlp(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)


class _Layer(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.self_attn = _Attn(hidden, hidden // 2)
        self.mlp = _Mlp(hidden, inter)


class _Moe(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.gate = nn.Linear(hidden, 4, bias=False)  # router


class _Model(nn.Module):
    def __init__(self, hidden: int = 32, inter: int = 64, layers: int = 2):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(_Layer(hidden, inter) for _ in range(layers))
        self.model.layers[1].moe = _Moe(hidden)
        self.lm_head = nn.Linear(hidden, 100, bias=False)


def test_fused_groups_and_kinds():
    sel = select_targets(_Model())
    names = [g.name for g in sel.groups]
    assert names == [
        "model.layers.0.self_attn.qkv",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_up",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.qkv",
        "model.layers.1.self_attn.o_proj",
        "model.layers.1.mlp.gate_up",
        "model.layers.1.mlp.down_proj",
    ]
    qkv = sel.groups[0]
    assert qkv.members == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert qkv.kind is GroupKind.ATTENTION_QKV and qkv.block_index == 0
    assert qkv.num_params == 32 * 32 + 2 * 32 * 16
    assert sel.groups[2].kind is GroupKind.MLP_GATE_UP
    assert sel.skipped == {
        "model.layers.1.moe.gate": "ignored by pattern",
        "lm_head": "ignored by pattern",
    }
    assert sel.group_of("model.layers.1.mlp.up_proj").name == "model.layers.1.mlp.gate_up"
    with pytest.raises(KeyError):
        sel.group_of("lm_head")


def test_unaligned_member_skips_whole_fused_group():
    model = _Model()
    model.model.layers[0].mlp.up_proj = nn.Linear(30, 64, bias=False)  # K=30: not a multiple of 16
    sel = select_targets(model)
    assert "model.layers.0.mlp.gate_up" not in [g.name for g in sel.groups]
    assert "multiple of 16" in sel.skipped["model.layers.0.mlp.up_proj"]
    assert sel.skipped["model.layers.0.mlp.gate_proj"].startswith("fused with")


def test_ignore_patterns():
    assert matches_any("lm_head", DEFAULT_IGNORE)
    assert matches_any("model.layers.3.block_sparse_moe.gate", DEFAULT_IGNORE)
    assert not matches_any("model.layers.3.mlp.gate_proj", DEFAULT_IGNORE)
    assert matches_any("model.layers.3.mlp.down_proj", ["down_proj"])
    assert not matches_any("model.layers.3.mlp.down_proj", ["proj"])
    assert matches_any("model.layers.3.mlp.down_proj", [r"re:.*layers\.3\..*"])
    sel = select_targets(_Model(), ignore=[*DEFAULT_IGNORE, "re:.*layers\\.0\\..*"])
    assert all(g.block_index == 1 for g in sel.groups)
    assert torch.is_tensor(_Model().lm_head.weight)
