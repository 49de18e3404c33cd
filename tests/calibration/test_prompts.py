"""calibration.prompts: one renderer for statistics, scoring, the plan and the canary."""

from __future__ import annotations

import copy

import pytest

from calibration.observers import tokenize_prompts
from calibration.prompts import (
    PromptError,
    RenderedPrompt,
    encode_prompt,
    flatten_messages,
    render_prompt,
)
from tests.calibration.replay_helpers import char_tokenizer

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def templated():
    tokenizer = copy.deepcopy(char_tokenizer())
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tokenizer


def test_chat_goes_through_the_template_with_the_generation_prompt(templated):
    rendered = render_prompt(templated, MESSAGES)
    assert rendered == RenderedPrompt("<s><system>be brief<user>hello<assistant>", templated=True)
    assert render_prompt(templated, "plain text") == RenderedPrompt("plain text", templated=False)
    assert render_prompt(templated, rendered) is rendered


def test_without_a_template_chat_is_flattened_and_not_templated():
    tokenizer = char_tokenizer()
    assert render_prompt(tokenizer, MESSAGES) == RenderedPrompt(flatten_messages(MESSAGES))
    with pytest.raises(PromptError, match="role"):
        render_prompt(tokenizer, [{"text": "x"}])
    with pytest.raises(PromptError):
        render_prompt(tokenizer, 42)


def test_templated_text_gets_no_second_bos_and_plain_text_gets_one(templated):
    templated.add_bos_token = True  # a tokenizer that adds BOS to plain text
    from tokenizers.processors import TemplateProcessing

    templated.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", templated.bos_token_id)]
    )
    bos = templated.bos_token_id
    chat = encode_prompt(templated, render_prompt(templated, MESSAGES), 1000)
    assert chat.input_ids.count(bos) == 1 and chat.input_ids[0] == bos
    plain = encode_prompt(templated, RenderedPrompt("hello"), 1000)
    assert plain.input_ids[0] == bos and not plain.truncated


def test_token_limit_truncates_and_counts_and_budget_stops_early():
    tokenizer = char_tokenizer()
    prompts = [RenderedPrompt("a" * 30), RenderedPrompt("b" * 5), RenderedPrompt("c" * 20)]
    cut = encode_prompt(tokenizer, prompts[0], 10)
    assert len(cut.input_ids) == 10 and cut.truncated
    lengths = [len(encode_prompt(tokenizer, p, 10).input_ids) for p in prompts]  # BOS included
    budget = lengths[0] + lengths[1]
    tokenized = tokenize_prompts(
        tokenizer, prompts, max_length=10, batch_size=2, token_budget=budget
    )
    # the first (cut) and the second fit; the third would exceed the budget
    assert tokenized.num_prompts == 2 and tokenized.num_tokens == budget
    assert tokenized.truncated == 1 and tokenized.over_budget == 1
    everything = tokenize_prompts(tokenizer, prompts, max_length=100, batch_size=2)
    full = sum(len(encode_prompt(tokenizer, p, 100).input_ids) for p in prompts)
    assert everything.truncated == 0 and everything.num_tokens == full > 55
