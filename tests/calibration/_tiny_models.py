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
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random init is near-uniform; sharpen the logits so KL has signal
        model.lm_head.weight.mul_(8.0)
    return model
