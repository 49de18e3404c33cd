"""One prompt renderer: what the server sees, for calibration statistics, scoring, the plan and the canary.

A chat request goes through the tokenizer's chat template with the generation prompt, as an
OpenAI-compatible server (vLLM's chat endpoint) renders it; a plain prompt stays as it is. The rendered
text is what calibration sets store and their digest describes. Encoding it: a templated text already
carries its special tokens (BOS and the like), so it is tokenized without adding them again; a plain
prompt is tokenized the way a completions endpoint does (special tokens added).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: A chat prompt: ``[{"role": "user", "content": "..."}, ...]``.
ChatMessages = Sequence[Mapping[str, Any]]
Prompt = str | ChatMessages


class PromptError(ValueError):
    """A prompt cannot be rendered (not a string or a list of role/content messages)."""


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the server sees it. ``templated``: the text came out of a chat template."""

    text: str
    templated: bool = False


@dataclass(frozen=True)
class EncodedPrompt:
    """Token ids of a rendered prompt, cut at the token limit (``truncated`` tells whether it was)."""

    input_ids: tuple[int, ...]
    truncated: bool


def chat_messages(prompt: Prompt) -> list[dict[str, Any]] | None:
    """``prompt`` as a list of message dicts, or None for a plain string; malformed input raises."""
    if isinstance(prompt, str):
        return None
    if not isinstance(prompt, Sequence) or not all(isinstance(m, Mapping) for m in prompt):
        raise PromptError(
            f"a prompt must be a string or a list of chat messages (dicts), got {type(prompt).__name__}"
        )
    messages = [dict(m) for m in prompt]
    for position, message in enumerate(messages):
        if "role" not in message or "content" not in message:
            raise PromptError(f"chat message {position} lacks 'role' or 'content'")
    return messages


def flatten_messages(messages: ChatMessages) -> str:
    """``role: content`` blocks separated by blank lines (the store's flattening; not for models)."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render_prompt(tokenizer: Any, prompt: Prompt | RenderedPrompt) -> RenderedPrompt:
    """``prompt`` as the server sees it: chat messages through ``tokenizer``'s chat template (with the
    generation prompt), a plain string as is. A tokenizer without a template renders chat as
    ``role: content`` lines (not templated). A :class:`RenderedPrompt` is returned unchanged."""
    if isinstance(prompt, RenderedPrompt):
        return prompt
    messages = chat_messages(prompt)
    if messages is None:
        return RenderedPrompt(prompt, templated=False)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return RenderedPrompt(str(text), templated=True)
    return RenderedPrompt(flatten_messages(messages), templated=False)


def encode_prompt(tokenizer: Any, prompt: RenderedPrompt, max_tokens: int) -> EncodedPrompt:
    """Token ids of ``prompt`` (special tokens added only to untemplated text), at most ``max_tokens``."""
    if max_tokens < 1:
        raise PromptError(f"max_tokens must be >= 1, got {max_tokens}")
    ids = tokenizer(prompt.text, add_special_tokens=not prompt.templated)["input_ids"]
    return EncodedPrompt(tuple(int(t) for t in ids[:max_tokens]), truncated=len(ids) > max_tokens)


@dataclass(frozen=True)
class PromptRenderer:
    """:func:`render_prompt` bound to one tokenizer (None: no template, chat is flattened);
    ``identity`` says which rendering it is."""

    tokenizer: Any = None

    def __call__(self, prompt: Prompt | RenderedPrompt) -> RenderedPrompt:
        return render_prompt(self.tokenizer, prompt)

    @property
    def identity(self) -> dict[str, str | None]:
        """Tokenizer class and the sha256 of its chat template (None: no template), for records."""
        import hashlib

        template = getattr(self.tokenizer, "chat_template", None)
        return {
            "tokenizer": None if self.tokenizer is None else type(self.tokenizer).__name__,
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest()
            if template
            else None,
        }
