"""Activation statistics on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from calibration.groups import select_targets
from calibration.observers import ActivationStats, collect_activation_stats, tokenize_batches
from tests.calibration._tiny_models import PROMPTS, char_tokenizer, tiny_llama


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    batches = tokenize_batches(char_tokenizer(), PROMPTS, max_length=24, batch_size=5)
    return model, batches, select_targets(model)


def test_tokenize_batches_right_pads_and_truncates():
    batches = tokenize_batches(char_tokenizer(), ["ab", "", "abcdefgh"], max_length=5, batch_size=2)
    assert [b.input_ids.shape for b in batches] == [torch.Size([2, 5])]
    assert batches[0].attention_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="no prompt"):
        tokenize_batches(char_tokenizer(), [""], max_length=5, batch_size=2)


def test_hooks_see_every_targeted_linear_and_are_removed(setup):
    model, batches, selection = setup
    seen: dict[str, float] = {}

    def spy(name):
        def hook(_m, args):
            seen[name] = max(seen.get(name, 0.0), float(args[0].abs().amax()))

        return hook

    modules = dict(model.named_modules())
    spies = [modules[m].register_forward_pre_hook(spy(m)) for m in selection.quantized_layers]
    stats = collect_activation_stats(model, batches, selection, progress=False)
    for handle in spies:
        handle.remove()
    assert set(stats.member_to_group) == set(selection.quantized_layers)
    assert len(selection.quantized_layers) == 2 * 7  # q,k,v,o,gate,up,down per block
    for name in selection.quantized_layers:
        assert stats.input_amax(name) > 0
        # pad positions excluded, so the recorded max never exceeds the max over all positions
        assert stats.input_amax(name) <= max(seen[m] for m in selection.group_of(name).members)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert stats.num_prompts == len(PROMPTS)
    assert stats.num_tokens == sum(b.num_tokens for b in batches)


def test_fused_groups_share_input_scale(setup):
    model, batches, selection = setup
    stats = collect_activation_stats(model, batches, selection, progress=False)
    for group in selection.groups:
        values = {stats.input_amax(m) for m in group.members}
        assert len(values) == 1, group.name
        scales = stats.module_input_amax()
        assert all(torch.equal(scales[m], scales[group.members[0]]) for m in group.members)
    qkv = selection.group_of("model.layers.0.self_attn.q_proj")
    assert qkv.members[1:] == ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")
    expected = torch.tensor([448.0 * 6.0]) / stats.group_input_amax[qkv.name]
    torch.testing.assert_close(stats.input_global_scale(qkv), expected)


def test_pad_positions_do_not_count(setup):
    model, _, selection = setup
    tok = char_tokenizer()
    alone = tokenize_batches(tok, ["abc"], max_length=24, batch_size=1)
    padded = tokenize_batches(tok, ["abc", "hello there my friend"], max_length=24, batch_size=2)
    padded[0].input_ids[0, 3:] = 7  # garbage under the pad mask
    short_only = collect_activation_stats(model, alone, selection, progress=False)
    both = collect_activation_stats(model, padded, selection, progress=False)
    long_only = collect_activation_stats(
        model,
        tokenize_batches(tok, ["hello there my friend"], max_length=24, batch_size=1),
        selection,
        progress=False,
    )
    for name, value in both.group_input_amax.items():
        expected = max(short_only.group_input_amax[name], long_only.group_input_amax[name])
        assert value == pytest.approx(expected, rel=1e-5), name


def test_stats_json_round_trip_and_hooks_removed_on_error(setup):
    model, batches, selection = setup
    stats = collect_activation_stats(model, batches[:1], selection, progress=False)
    assert ActivationStats.from_json(stats.to_json()) == stats

    bad = [batches[0], None]  # the second batch blows up mid-run
    with pytest.raises(AttributeError):
        collect_activation_stats(model, bad, selection, progress=False)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_batches_respect_the_padded_token_cap():
    """Long prompts go in smaller batches (attention costs rows x seq²); a prompt longer than the cap
    still gets a batch of its own, and every prompt is kept, in length order."""
    from calibration.observers import _chunks

    sequences = [(1,) * n for n in (3, 5, 8, 40, 60, 300)]
    chunks = _chunks(sequences, batch_size=4, max_batch_tokens=100)
    assert [[len(s) for s in c] for c in chunks] == [[3, 5, 8], [40], [60], [300]]
    assert all(len(c) * len(c[-1]) <= 100 for c in chunks if len(c) > 1)
    assert [len(c) for c in _chunks(sequences, batch_size=4, max_batch_tokens=None)] == [4, 2]
