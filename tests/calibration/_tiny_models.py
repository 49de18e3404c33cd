"""Tiny random Llama + character tokenizer for the sensitivity tests (no hub, builds in milliseconds)."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ALPHABET = string.ascii_lowercase + string.digits + " .,?!"

PROMPTS = [
    "what is the capital of france?",
    "summarize this ticket: printer on floor 3 jams",
    "translate hello world to german",
    "write a haiku about rain",
    "how many legs does a spider have?",
    "list three prime numbers",
    "explain tcp slow start briefly",
    "is 2027 a leap year?",
    "draft a polite reminder email",
    "why is the sky blue?",
    "name a river in africa",
    "count to five",
]


def char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(ALPHABET)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(num_layers: int = 2, seed: int = 0, vocab_size: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return _sharpened(LlamaForCausalLM(config).eval())


def _sharpened(model):
    with torch.no_grad():  # random init is near-uniform; sharpen the logits so KL has signal
        model.lm_head.weight.mul_(8.0)
    return model


def _tiny_moe(config_cls, model_cls, seed: int, num_layers: int, **shape):
    """hidden 64, 4 heads (2 KV), top-2 routing, untied head; ``shape``: the family's expert sizes."""
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        **shape,
    )
    return _sharpened(model_cls(config).eval())


def tiny_mixtral(num_experts: int = 4, seed: int = 0, num_layers: int = 2):
    """Mixtral shape: experts [E, 2*32, 64] / [E, 64, 32], no shared expert."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _tiny_moe(
        MixtralConfig,
        MixtralForCausalLM,
        seed,
        num_layers,
        intermediate_size=32,
        num_local_experts=num_experts,
    )


def tiny_qwen2_moe(num_experts: int = 4, seed: int = 0, num_layers: int = 2):
    """Qwen2-MoE shape: routed experts of 32, a shared expert of 64 with its sigmoid gate."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    model = _tiny_moe(
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        seed,
        num_layers,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        num_experts=num_experts,
    )
    with torch.no_grad():  # give the router a direction so routing depends on x
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0.0, 0.5)
    return model


def tiny_qwen3_moe(num_experts: int = 4, seed: int = 0, num_layers: int = 2):
    """Qwen3-MoE shape (no shared expert)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return _tiny_moe(
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        seed,
        num_layers,
        intermediate_size=64,
        moe_intermediate_size=32,
        head_dim=16,
        num_experts=num_experts,
    )
