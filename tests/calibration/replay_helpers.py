"""Tiny models and tokenizer for replay-evaluator tests (no downloads, CPU, milliseconds per forward)."""

from __future__ import annotations

import copy
import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kernels.reference import (
    fake_quantize_nvfp4_activation_reference,
    fake_quantize_nvfp4_weight_reference,
)

SAMPLE_PROMPTS: tuple[str, ...] = tuple(
    f"request {i}: please summarise the {topic} report for {team} in {n} bullet points."
    for i, (topic, team, n) in enumerate(
        (t, m, k)
        for t in ("sales", "latency", "billing", "security", "hiring")
        for m in ("ops", "finance", "the board", "support")
        for k in (3, 5, 7)
    )
)  # 60 distinct prompts


def char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level fast tokenizer over printable ASCII, with <s> prepended (BOS)."""
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    from tokenizers.processors import TemplateProcessing

    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    """2 layers, hidden 64, intermediate 128, random weights (fixed seed), fp32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # random init is tiny (std 0.02); widen it so distributions are not flat
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model.eval()


def _decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and ".layers." in f".{name}"
    }


def fake_quantized_copy(model: nn.Module, global_scale_factor: float = 1.0) -> nn.Module:
    """W4A16 candidate: every decoder Linear's weight through the NVFP4 reference codec, with its
    proper global scale times ``global_scale_factor`` (>1 saturates blocks: a damaged candidate)."""
    candidate = copy.deepcopy(model)
    with torch.no_grad():
        for module in _decoder_linears(candidate).values():
            weight = module.weight
            gs = 448.0 * 6.0 / float(weight.abs().amax()) * global_scale_factor
            weight.copy_(fake_quantize_nvfp4_weight_reference(weight, gs))
    return candidate


def attach_w4a4(model: nn.Module, input_amax: float) -> list[str]:
    """Emulate a loaded W4A4 checkpoint: every decoder Linear gets ``input_global_scale =
    448*6/input_amax`` and an activation fake-quant pre-hook (registered first, as a loader would)."""
    names = []
    for name, module in _decoder_linears(model).items():
        scale = torch.tensor([448.0 * 6.0 / input_amax], dtype=torch.float32)
        module.register_buffer("input_global_scale", scale)

        def hook(mod: nn.Module, args: tuple) -> tuple:
            return (fake_quantize_nvfp4_activation_reference(args[0], mod.input_global_scale),)

        module.register_forward_pre_hook(hook)
        names.append(name)
    return names
