"""Activation statistics: the static input absolute maximum of every targeted Linear.

Like compressed-tensors' ``static_minmax`` observer, the statistic is the running maximum of ``|x|`` over
the whole calibration set (never a mean of per-batch maxima). Pad positions are excluded. Members of a
fused group (``q/k/v``, ``gate/up``) see the same input, and vLLM needs one ``input_global_scale`` per
fused weight, so the group maximum is shared by every member.

Routed MoE experts are observed inside their fused experts forward, each over the tokens routed to it
(:mod:`calibration.moe`); experts that saw no token fall back to a safe amax, recorded in
``ActivationStats.experts``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.groups import LinearGroup, TargetSelection
from calibration.moe import ExpertInputObserver, ExpertInputStats, resolve_expert_input_amax
from calibration.precision import ExpertInputScale
from calibration.prompts import RenderedPrompt, encode_prompt
from kernels import global_scale_from_amax

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenBatch:
    """Right-padded token ids. ``input_ids``/``attention_mask``: int64 ``[batch, seq]``; mask 1 = real."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))


@dataclass(frozen=True)
class TokenizedPrompts:
    """Prompts as right-padded batches, and what the token limits cut."""

    batches: tuple[TokenBatch, ...]
    num_prompts: int  # prompts in the batches
    num_tokens: int
    truncated: int  # prompts cut at the per-prompt limit
    over_budget: int  # prompts left out because the token budget was spent


#: Padded tokens per batch at most (``rows x longest``): attention over a long prompt costs
#: ``rows x heads x seq²`` floats, so long prompts go in smaller batches (one alone if need be).
DEFAULT_MAX_BATCH_TOKENS = 2048


def _chunks(
    sequences: Sequence[tuple[int, ...]], batch_size: int, max_batch_tokens: int | None
) -> list[list[tuple[int, ...]]]:
    """Consecutive chunks of the length-sorted ``sequences``: at most ``batch_size`` rows and, when
    given, at most ``max_batch_tokens`` padded tokens (a longer sequence still gets a chunk alone)."""
    chunks: list[list[tuple[int, ...]]] = []
    for seq in sequences:
        current = chunks[-1] if chunks else None
        fits = (
            current is not None
            and len(current) < batch_size
            and (max_batch_tokens is None or (len(current) + 1) * len(seq) <= max_batch_tokens)
        )
        if fits:
            current.append(seq)
        else:
            chunks.append([seq])
    return chunks


def tokenize_prompts(
    tokenizer,
    prompts: Sequence[RenderedPrompt | str],
    *,
    max_length: int,
    batch_size: int,
    token_budget: int | None = None,
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
) -> TokenizedPrompts:
    """Tokenize rendered prompts (a ``str`` is a plain prompt) into right-padded batches.

    Each prompt is cut at ``max_length`` tokens (counted in ``truncated``); with ``token_budget``,
    prompts are taken in the given order until the budget is spent (the rest counted in
    ``over_budget``). Prompts are sorted by length (stable) so batches carry little padding; the pad id
    is irrelevant because every consumer masks pad positions out; a batch holds at most
    ``max_batch_tokens`` padded tokens (long prompts go in smaller batches). Empty prompts are dropped with a
    warning. Raises ``ValueError`` when nothing is left or the sizes are not positive.
    """
    if max_length < 1 or batch_size < 1:
        raise ValueError(f"max_length and batch_size must be >= 1, got {max_length}, {batch_size}")
    sequences: list[tuple[int, ...]] = []
    truncated = over_budget = spent = empty = 0
    for prompt in prompts:
        rendered = prompt if isinstance(prompt, RenderedPrompt) else RenderedPrompt(prompt)
        encoded = encode_prompt(tokenizer, rendered, max_length)
        if not encoded.input_ids:
            empty += 1
            continue
        if token_budget is not None and spent + len(encoded.input_ids) > token_budget:
            over_budget += 1
            continue
        spent += len(encoded.input_ids)
        truncated += encoded.truncated
        sequences.append(encoded.input_ids)
    if empty:
        logger.warning("dropped %d prompt(s) with no tokens", empty)
    if not sequences:
        raise ValueError("no prompt produced any token; cannot calibrate or evaluate on nothing")
    sequences.sort(key=len)
    batches = []
    for chunk in _chunks(sequences, batch_size, max_batch_tokens):
        width = len(chunk[-1])  # sorted: the last is the longest
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, seq in enumerate(chunk):
            input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, : len(seq)] = 1
        batches.append(TokenBatch(input_ids, attention_mask))
    return TokenizedPrompts(
        batches=tuple(batches),
        num_prompts=len(sequences),
        num_tokens=spent,
        truncated=truncated,
        over_budget=over_budget,
    )


def tokenize_batches(
    tokenizer, prompts: Sequence[RenderedPrompt | str], *, max_length: int, batch_size: int
) -> list[TokenBatch]:
    """:func:`tokenize_prompts` without a budget, batches only."""
    return list(
        tokenize_prompts(tokenizer, prompts, max_length=max_length, batch_size=batch_size).batches
    )


@dataclass(frozen=True)
class ActivationStats:
    """Static input amax per fused group (shared by its members), over ``num_tokens`` real tokens.

    For routed expert groups ``group_input_amax`` holds the amax they are quantized with (after the
    fallback and the layer policy); ``experts`` records what was observed and who fell back."""

    group_input_amax: Mapping[str, float]  # group name -> max |x| over the calibration set
    member_to_group: Mapping[str, str]  # Linear module name -> group name
    num_prompts: int
    num_tokens: int
    truncated_prompts: int = 0  # cut at the per-prompt token limit
    over_budget_prompts: int = 0  # left out by the token budget
    experts: ExpertInputStats | None = None  # MoE models only

    def input_amax(self, module_name: str) -> float:
        return self.group_input_amax[self.member_to_group[module_name]]

    def input_global_scale(self, group: LinearGroup | str) -> torch.Tensor:
        """``448*6 / amax`` as FP32 ``[1]`` (the compressed-tensors ``input_global_scale``)."""
        name = group.name if isinstance(group, LinearGroup) else group
        return global_scale_from_amax(
            torch.tensor(self.group_input_amax[name], dtype=torch.float32)
        )

    def module_input_amax(self) -> dict[str, torch.Tensor]:
        """``{module name: amax}`` (FP32 ``[1]``) for every targeted Linear, as checkpoint export takes it."""
        return {
            member: torch.tensor([self.group_input_amax[group]], dtype=torch.float32)
            for member, group in self.member_to_group.items()
        }

    def to_json(self) -> str:
        return json.dumps(
            {
                "group_input_amax": dict(self.group_input_amax),
                "member_to_group": dict(self.member_to_group),
                "num_prompts": self.num_prompts,
                "num_tokens": self.num_tokens,
                "truncated_prompts": self.truncated_prompts,
                "over_budget_prompts": self.over_budget_prompts,
                "experts": None if self.experts is None else self.experts.to_dict(),
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> ActivationStats:
        data = json.loads(text)
        return cls(
            group_input_amax={k: float(v) for k, v in data["group_input_amax"].items()},
            member_to_group=dict(data["member_to_group"]),
            num_prompts=int(data["num_prompts"]),
            num_tokens=int(data["num_tokens"]),
            truncated_prompts=int(data.get("truncated_prompts", 0)),
            over_budget_prompts=int(data.get("over_budget_prompts", 0)),
            experts=ExpertInputStats.from_dict(data["experts"]) if data.get("experts") else None,
        )


class _AmaxRecorder:
    """Forward pre-hooks that fold ``max |x|`` of each Linear's real-token inputs into a running max."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.amax: dict[str, float] = dict.fromkeys(modules, 0.0)
        self.seen: set[str] = set()
        self.token_mask: torch.Tensor | None = None  # bool [batch, seq] of the batch being run
        self._handles = [
            mod.register_forward_pre_hook(self._hook(name)) for name, mod in modules.items()
        ]

    def _hook(self, name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            mask = self.token_mask
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                x = x[mask]  # [real tokens, in_features]; pad positions never count
            elif mask is not None and x.dim() == 2 and x.shape[0] == mask.numel():
                x = x[mask.reshape(-1)]  # flattened [batch * seq, in] (e.g. a MoE shared expert)
            if x.numel() == 0:
                return
            value = float(x.detach().abs().amax())
            if not math.isfinite(value):
                raise ValueError(f"non-finite input seen by {name!r} during calibration")
            self.amax[name] = max(self.amax[name], value)
            self.seen.add(name)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def head_free_forward(model: nn.Module) -> Callable[..., Any] | None:
    """The model without its output head (``model.get_decoder()``: embeddings, blocks, final norm),
    when its logits are a plain ``lm_head(hidden)``; None when the model post-processes them (logit
    soft-capping or scaling) or has no separate decoder. Over long prompts the head's
    ``[batch, seq, vocab]`` logits dominate memory; stats need none of them, scoring only the real
    tokens' ones."""
    config = getattr(model, "config", None)
    if any(getattr(config, k, None) for k in ("final_logit_softcapping", "logit_scale")):
        return None
    get_decoder = getattr(model, "get_decoder", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model or not isinstance(head, nn.Linear):
        return None
    return decoder


@torch.inference_mode()
def collect_activation_stats(
    model: nn.Module,
    batches: Sequence[TokenBatch],
    selection: TargetSelection,
    *,
    progress: bool = True,
    expert_input_scale: ExpertInputScale = ExpertInputScale.LAYER,
) -> ActivationStats:
    """Run ``model`` over ``batches`` and return the static input amax of every targeted fused group.

    Precondition: every member of ``selection.groups`` is an ``nn.Linear`` of ``model`` or a routed
    expert's projection (``expert_slots``). The hooks are removed afterwards, also on error. Raises
    ``RuntimeError`` when a targeted Linear or experts module never ran. Routed experts:
    :func:`calibration.moe.resolve_expert_input_amax` under ``expert_input_scale``.
    """
    if not batches:
        raise ValueError("no calibration batches")
    modules = dict(model.named_modules())
    linear_groups = [g for g in selection.groups if not g.expert_slots]
    expert_groups = [g for g in selection.groups if g.expert_slots]
    targets = {m: modules[m] for g in linear_groups for m in g.members}
    experts_modules = sorted({g.tier_unit for g in expert_groups})
    device = _model_device(model)
    recorder = _AmaxRecorder(targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets_head = head is not None and any(m is head for m in targets.values())
    forward = (None if targets_head else head_free_forward(model)) or model
    observer = None
    num_prompts = 0
    num_tokens = 0
    try:
        observer = ExpertInputObserver(model, experts_modules)
        for batch in tqdm(batches, desc="activation stats", unit="batch", disable=not progress):
            batch = batch.to(device)
            recorder.token_mask = observer.token_mask = batch.attention_mask.bool()
            forward(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            num_prompts += batch.input_ids.shape[0]
            num_tokens += batch.num_tokens
    finally:
        recorder.remove()
        if observer is not None:
            observer.remove()
    missing = sorted(set(targets) - recorder.seen) + sorted(set(experts_modules) - observer.ran)
    if missing:
        raise RuntimeError(
            f"{len(missing)} targeted Linear(s) / experts never ran on the calibration set: "
            f"{missing[:5]}"
        )
    group_amax = {g.name: max(recorder.amax[m] for m in g.members) for g in linear_groups}
    experts = None
    if expert_groups:
        expert_amax, experts = resolve_expert_input_amax(
            expert_groups, observer, expert_input_scale
        )
        group_amax.update(expert_amax)
        if experts.fallbacks:
            logger.warning(
                "%d of %d routed expert groups saw no usable calibration token and fall back "
                "(e.g. %s: %s)",
                experts.fallback_count,
                len(expert_groups),
                *next(iter(experts.fallbacks.items())),
            )
        group_amax = {g.name: group_amax[g.name] for g in selection.groups}  # model order
    for name, amax in group_amax.items():
        if amax == 0.0:
            logger.warning(
                "group %s saw only zero inputs; its input_global_scale is undefined", name
            )
    logger.info("activation stats over %d prompts / %d tokens", num_prompts, num_tokens)
    return ActivationStats(
        group_input_amax=group_amax,
        member_to_group={m: g.name for g in selection.groups for m in g.members},
        num_prompts=num_prompts,
        num_tokens=num_tokens,
        experts=experts,
    )


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")
