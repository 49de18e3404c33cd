"""Per-group KL sensitivity: how far each fused group, quantized alone, moves the next-token distribution.

The reference is the unquantized model's next-token distribution at every real (non-pad) position of the
held-out prompts, computed once (:func:`compute_baseline`). Each group is then fake-quantized alone
(W4A4: weights plus its inputs, under the calibrated ``input_global_scale``; W4A16: weights only) and
scored (:func:`sweep_groups`): mean KL(P_base ‖ P_quant) per token, p99 token KL, top-1 agreement.

Block-input cache: the baseline pass stores the hidden states entering each decoder block a group lives
in. Scoring a group in block ``b`` then swaps blocks ``0..b-1`` for stand-ins that hand over the cached
hidden states, and the model's own forward runs blocks ``b..L-1``, the final norm and the head (masks and
rotary embeddings are recomputed by the model, which is cheap). The blocks before ``b`` are unchanged by
quantizing a group in ``b``, so the result equals a full forward up to float reassociation (in practice
bit-identical on one device).

Memory: the baseline keeps log-probs of every real evaluation token, ``tokens × vocab`` values in
``logprob_dtype`` (float32 by default: exact; float16/bfloat16 halve it at a relative error of
2^-11 / 2^-8 on each log-prob), plus the cached block inputs, ``cached blocks × batch × seq × hidden``.
Nothing grows with the number of groups: each group's logits are reduced to per-token KL batch by batch.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import queue
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from calibration.emulate import GroupQuantization, emulate, quantize_groups
from calibration.groups import LinearGroup, TargetSelection
from calibration.memory import release_free_memory
from calibration.observers import ActivationStats, TokenBatch, _model_device, head_free_forward
from calibration.precision import Tier

if TYPE_CHECKING:
    from calibration.rounding import RoundedGroup

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityScore:
    """Quantized vs baseline over the held-out tokens. KL in nats; perplexity over next-token targets."""

    mean_kl: float
    p99_kl: float
    top1_agreement: float
    base_perplexity: float
    perplexity: float
    num_tokens: int

    @property
    def delta_perplexity(self) -> float:
        """Relative change, ``ppl / ppl_base - 1`` (0.01 = one percent worse)."""
        return self.perplexity / self.base_perplexity - 1.0


@dataclass(frozen=True)
class GroupSensitivity:
    """One fused group quantized alone."""

    group: str
    kind: str
    block_index: int | None
    members: tuple[str, ...]
    num_params: int
    mean_kl: float
    p99_kl: float
    top1_agreement: float
    delta_perplexity: float
    num_tokens: int


@dataclass(frozen=True)
class EvalBatch:
    """One evaluation batch and the baseline's view of it. ``R`` = real tokens of the batch."""

    tokens: TokenBatch
    base_logprobs: torch.Tensor  # [R, vocab], logprob_dtype, rows in attention_mask.bool() order
    base_top1: torch.Tensor  # [R] int64
    target_ids: torch.Tensor  # [R] int64, the next token (meaningful where has_target)
    has_target: torch.Tensor  # [R] bool, a real next token exists
    base_target_nll: torch.Tensor  # [R] float64, 0 where not has_target
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> [B, T, hidden]


@dataclass(frozen=True)
class Baseline:
    batches: tuple[EvalBatch, ...]
    num_prompts: int
    num_tokens: int
    logprob_dtype: torch.dtype
    cached_blocks: tuple[int, ...]

    def without_block_cache(self) -> Baseline:
        """The same baseline without the cached block inputs (``batches × seq × hidden`` floats per
        cached block), once no exact check resumes from them."""
        release = tuple(dataclasses.replace(b, block_inputs={}) for b in self.batches)
        return dataclasses.replace(self, batches=release, cached_blocks=())

    @property
    def perplexity(self) -> float:
        nll = sum(float(b.base_target_nll.sum()) for b in self.batches)
        count = sum(int(b.has_target.sum()) for b in self.batches)
        return float(np.exp(nll / max(count, 1)))


# --------------------------------------------------------------------------------------------- helpers


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block stack (``*.layers``) whose indices ``LinearGroup.block_index`` refers to."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers":
            return module
    raise ValueError(
        f"{type(model).__name__} has no '*.layers' ModuleList; cannot cache block inputs"
    )


def blocks_to_cache(groups: Iterable[LinearGroup]) -> tuple[int, ...]:
    """Blocks worth caching for ``groups`` (block 0 needs nothing: it starts at the embeddings)."""
    return tuple(sorted({g.block_index for g in groups if g.block_index}))


class _HandOver(nn.Module):
    """Stands in for a skipped decoder block: returns ``hidden`` if set, else its input unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states if self.hidden is None else self.hidden


@contextmanager
def _resume_at(model: nn.Module, block_index: int) -> Iterator[_HandOver]:
    """Swap blocks ``0..block_index-1`` for stand-ins; the last one hands over the cached input."""
    layers = decoder_layers(model)
    originals = [layers[i] for i in range(block_index)]
    handover = _HandOver()
    try:
        for i in range(block_index):
            layers[i] = handover if i == block_index - 1 else _HandOver()
        yield handover
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


# ------------------------------------------------------------------------------------------- baseline


def _targets(tokens: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    mask = tokens.attention_mask.bool()
    next_ids = torch.roll(tokens.input_ids, -1, dims=1)
    has_next = mask & torch.roll(mask, -1, dims=1)
    has_next[:, -1] = False
    return next_ids[mask], has_next[mask]


def _forward_logits(model: nn.Module, tokens: TokenBatch) -> torch.Tensor:
    """Logits of real tokens only, FP32 ``[R, vocab]`` (the head runs on the real tokens alone when
    the model allows it: :func:`calibration.observers.head_free_forward`)."""
    real = tokens.attention_mask.bool()
    decoder = head_free_forward(model)
    if decoder is None:
        out = model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, use_cache=False
        )
        return out.logits[real].float()
    hidden = decoder(
        input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, use_cache=False
    ).last_hidden_state  # [batch, seq, hidden]
    return model.get_output_embeddings()(hidden[real]).float()  # [R, vocab]


def _logit_chunks(
    model: nn.Module, tokens: TokenBatch, rows: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, FP32 logits [≤rows, vocab])`` of the real tokens, the head applied ``rows``
    real tokens at a time: one prompt of 2048 tokens would otherwise hold 2048 × vocab floats
    (SmolLM2: 400 MB) at once, and its log-softmax as many again."""
    real = tokens.attention_mask.bool()
    decoder = head_free_forward(model)
    if decoder is None:
        logits = _forward_logits(model, tokens)
        for start in range(0, logits.shape[0], rows):
            yield start, logits[start : start + rows]
        return
    hidden = decoder(
        input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, use_cache=False
    ).last_hidden_state[real]  # [R, hidden]
    head = model.get_output_embeddings()
    for start in range(0, hidden.shape[0], rows):
        yield start, head(hidden[start : start + rows]).float()


@torch.inference_mode()
def compute_baseline(
    model: nn.Module,
    batches: Sequence[TokenBatch],
    *,
    cache_blocks: Iterable[int] = (),
    logprob_dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> Baseline:
    """Run the unquantized ``model`` once over ``batches``: log-probs, top-1, NLL, block inputs."""
    if not batches:
        raise ValueError("no evaluation batches")
    device = _model_device(model)
    cache_blocks = tuple(sorted(set(cache_blocks)))
    layers = decoder_layers(model) if cache_blocks else None
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def capture(index: int):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = hidden.detach().clone()

        return hook

    def check_output(_module, _args, output):
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(
                "decoder blocks return a tuple; the block-input cache needs blocks returning the "
                "hidden states tensor (transformers >= 5). Use use_block_cache=False."
            )

    eval_batches = []
    try:
        if layers is not None:
            for index in cache_blocks:
                if not 0 < index < len(layers):
                    raise ValueError(f"block {index} is outside 1..{len(layers) - 1}")
                handles.append(
                    layers[index].register_forward_pre_hook(capture(index), with_kwargs=True)
                )
            handles.append(layers[0].register_forward_hook(check_output))
        for tokens in tqdm(batches, desc="baseline", unit="batch", disable=not progress):
            tokens = tokens.to(device)
            captured.clear()
            target_ids, has_target = _targets(tokens)
            kept, top1, nll = [], [], []
            for start, logits in _logit_chunks(model, tokens, _ROWS):
                logprobs = torch.log_softmax(logits, dim=-1)  # [rows, vocab]
                target = target_ids[start : start + logits.shape[0], None]
                kept.append(logprobs.to(logprob_dtype))
                top1.append(logprobs.argmax(-1))
                nll.append(-logprobs.gather(-1, target).squeeze(-1).double())
            nll = torch.cat(nll)
            eval_batches.append(
                EvalBatch(
                    tokens=tokens,
                    base_logprobs=torch.cat(kept),
                    base_top1=torch.cat(top1),
                    target_ids=target_ids,
                    has_target=has_target,
                    base_target_nll=torch.where(has_target, nll, 0.0),
                    block_inputs=dict(captured),
                )
            )
            del kept, logprobs, logits
            release_free_memory()
    finally:
        for handle in handles:
            handle.remove()
    return Baseline(
        batches=tuple(eval_batches),
        num_prompts=sum(b.tokens.input_ids.shape[0] for b in eval_batches),
        num_tokens=sum(b.tokens.num_tokens for b in eval_batches),
        logprob_dtype=logprob_dtype,
        cached_blocks=cache_blocks,
    )


# ------------------------------------------------------------------------------------------- scoring


#: Rows of ``[tokens, vocab]`` scored at a time (memory of the KL's temporaries).
_ROWS = 64


@dataclass
class _Accumulator:
    kl: list[np.ndarray] = field(default_factory=list)
    agree: int = 0
    nll: float = 0.0
    nll_count: int = 0

    def add(self, logits: torch.Tensor, batch: EvalBatch, first_row: int = 0) -> None:
        """Accumulate ``logits`` (rows ``first_row...`` of the batch's real tokens, ``[rows, vocab]``)
        against the batch's baseline, ``_ROWS`` rows at a time (each row is independent: the same
        bits as all at once, a fraction of the temporaries)."""
        for offset in range(0, logits.shape[0], _ROWS):
            start = first_row + offset
            rows = slice(start, start + min(_ROWS, logits.shape[0] - offset))
            log_q = torch.log_softmax(logits[offset : offset + _ROWS], dim=-1)  # [rows, vocab]
            log_p = batch.base_logprobs[rows].float()
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)  # tiny negatives: rounding
            self.kl.append(kl.double().cpu().numpy())
            self.agree += int((log_q.argmax(-1) == batch.base_top1[rows]).sum())
            target = batch.target_ids[rows]
            nll = -log_q.gather(-1, target[:, None]).squeeze(-1).double()
            has_target = batch.has_target[rows]
            self.nll += float(nll[has_target].sum())
            self.nll_count += int(has_target.sum())

    def score(self, baseline: Baseline) -> QualityScore:
        kl = np.concatenate(self.kl)
        return QualityScore(
            mean_kl=float(kl.mean()),
            p99_kl=float(np.quantile(kl, 0.99)),
            top1_agreement=self.agree / kl.size,
            base_perplexity=baseline.perplexity,
            perplexity=float(np.exp(self.nll / max(self.nll_count, 1))),
            num_tokens=int(kl.size),
        )


@torch.inference_mode()
def score_emulation(
    model: nn.Module,
    baseline: Baseline,
    quantized: Sequence[GroupQuantization],
    *,
    storage_dtype: torch.dtype | None = None,
    use_block_cache: bool = True,
) -> QualityScore:
    """Emulate ``quantized`` together (:func:`calibration.emulate.emulate`) and score it against
    ``baseline`` (same batches it was built from).

    With ``use_block_cache`` the forward resumes at the earliest changed block when it is cached (not
    with ``storage_dtype``, which may change the embeddings).
    """
    changed = [q.group for q in quantized if q.tier.quantizes_weights]
    first_block = min((g.block_index for g in changed if g.block_index is not None), default=None)
    if any(g.block_index is None for g in changed) or storage_dtype is not None:
        first_block = None  # something outside the block stack (e.g. embeddings) may change
    resume = use_block_cache and first_block is not None and first_block in baseline.cached_blocks
    acc = _Accumulator()
    # whole-model plans: decoding per call holds no decoded copy of the model between batches
    with emulate(model, quantized, storage_dtype=storage_dtype, decode_per_call=not resume):
        if resume:
            with _resume_at(model, first_block) as handover:
                for batch in baseline.batches:
                    handover.hidden = batch.block_inputs[first_block]
                    for start, logits in _logit_chunks(model, batch.tokens, _ROWS):
                        acc.add(logits, batch, start)
        else:
            for batch in baseline.batches:
                for start, logits in _logit_chunks(model, batch.tokens, _ROWS):
                    acc.add(logits, batch, start)
                release_free_memory()
    return acc.score(baseline)


def score_quantized(
    model: nn.Module,
    baseline: Baseline,
    groups: Sequence[LinearGroup],
    stats: ActivationStats | None,
    tier: Tier = Tier.NVFP4,
    *,
    rounded: Mapping[str, RoundedGroup] | None = None,
    use_block_cache: bool = True,
) -> QualityScore:
    """``groups`` quantized together under one ``tier`` (``rounded`` weights and scales where given,
    else round-to-nearest), scored against ``baseline``. W4A4 needs ``stats`` (the calibrated input
    amax of each group)."""
    amax = None if stats is None else stats.group_input_amax
    if Tier(tier) is Tier.NVFP4 and stats is None:
        raise ValueError("W4A4 needs activation stats (input amax) for the input_global_scale")
    quantized = quantize_groups(model, groups, Tier(tier), amax, rounded=rounded)
    return score_emulation(model, baseline, quantized, use_block_cache=use_block_cache)


def group_sensitivity(group: LinearGroup, score: QualityScore) -> GroupSensitivity:
    return GroupSensitivity(
        group=group.name,
        kind=group.kind.value,
        block_index=group.block_index,
        members=group.members,
        num_params=group.num_params,
        mean_kl=score.mean_kl,
        p99_kl=score.p99_kl,
        top1_agreement=score.top1_agreement,
        delta_perplexity=score.delta_perplexity,
        num_tokens=score.num_tokens,
    )


def sweep_groups(
    model: nn.Module,
    baseline: Baseline,
    groups: Sequence[LinearGroup],
    stats: ActivationStats | None,
    tier: Tier = Tier.NVFP4,
    *,
    rounded: Mapping[str, RoundedGroup] | None = None,
    use_block_cache: bool = True,
    num_workers: int = 1,
    progress: bool = True,
) -> tuple[GroupSensitivity, ...]:
    """Score each of ``groups`` quantized alone, in the order given.

    ``num_workers > 1`` runs groups in a thread pool, each worker on its own deep copy of ``model``
    (torch releases the GIL inside ops); results do not depend on the worker count. A subset of
    groups can run anywhere (another process or host) and be merged with :func:`merge_sensitivities`.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    groups = list(groups)
    bar = tqdm(total=len(groups), desc="KL sweep", unit="group", disable=not progress)
    replicas: queue.Queue[nn.Module] = queue.Queue()
    replicas.put(model)
    for _ in range(min(num_workers, len(groups)) - 1):
        replicas.put(copy.deepcopy(model))

    def run(group: LinearGroup) -> GroupSensitivity:
        replica = replicas.get()
        try:
            score = score_quantized(
                replica,
                baseline,
                [group],
                stats,
                tier,
                rounded=rounded,
                use_block_cache=use_block_cache,
            )
        finally:
            replicas.put(replica)
        bar.update(1)
        logger.debug("group %s: mean KL %.5f", group.name, score.mean_kl)
        return group_sensitivity(group, score)

    try:
        if num_workers == 1:
            return tuple(run(g) for g in groups)
        with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="kl-sweep") as pool:
            return tuple(pool.map(run, groups))
    finally:
        bar.close()


def merge_sensitivities(
    parts: Iterable[Sequence[GroupSensitivity]], selection: TargetSelection
) -> tuple[GroupSensitivity, ...]:
    """Merge sweeps of disjoint group subsets into model order. Raises on duplicates or unknowns."""
    order = {g.name: i for i, g in enumerate(selection.groups)}
    merged: dict[str, GroupSensitivity] = {}
    for part in parts:
        for record in part:
            if record.group not in order:
                raise ValueError(f"group {record.group!r} is not in the target selection")
            if record.group in merged:
                raise ValueError(f"group {record.group!r} was scored twice")
            merged[record.group] = record
    return tuple(sorted(merged.values(), key=lambda r: order[r.group]))
