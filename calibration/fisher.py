"""Sensitivity in one pass: a Fisher estimate of every fused group's KL contribution at every tier.

The exact sweep (:func:`calibration.sensitivity.sweep_groups`) runs one forward per group per tier.
This module scores all groups and tiers at once, AutoQuantize-style (NVIDIA ModelOpt's gradient
searcher): with the unquantized model, labels are drawn from the model's own next-token distribution,
the NLL of those labels is backpropagated to every Linear's OUTPUT (no weight gradients), and the
change of the KL from quantizing a group is the second-order term of a Taylor expansion in that
output, with the Fisher information standing in for the Hessian:

    KL(P_base ‖ P_quant) ≈ ½ · Δyᵀ F Δy,    F = E_{labels ~ P_base}[∇_y ℓ ∇_y ℓᵀ]

where ``Δy`` is the change of the group members' outputs when the group is quantized alone at a tier:
``Δy = Q_in(x) · W_qᵀ − x · Wᵀ`` from the layer's real input ``x``, with the tier's emulation from
:mod:`calibration.emulate` (decoded checkpoint weights; W4A4 inputs fake-quantized under the calibrated
``input_global_scale``; FP8 inputs per token, dynamically). BF16 costs nothing (estimate 0).

Forms of the quadratic (all three come out of one :func:`fisher_pass`; :data:`DEFAULT_FORM` is used):

* ``sequence`` — ``½ Σ_seq (Σ_positions Σ_members g·Δy)²``. With labels drawn independently at each
  position from the model, the gradients of different positions' losses are uncorrelated with zero
  mean, so this is an unbiased estimate of the full Fisher quadratic form of the linearised KL summed
  over the sequence's positions (it keeps how errors at different positions add up in later tokens).
* ``token`` — ``½ Σ_positions (Σ_members g·Δy)²``: drops the cross-position terms; less noise, biased.
* ``diagonal`` — ``½ Σ_positions Σ_members Σ_out g²·Δy²``: ModelOpt's diagonal Fisher per element.

Each is divided by the number of real tokens and of label draws: nats per token, the unit of the
exact sweep's ``mean_kl``.

Measurements (``benchmarks/sensitivity_rank.py``, JSON in ``benchmarks/results/``). SmolLM2-135M fp32,
120 groups; the exact sweep on 4 sensitivity prompts of the shipped logs cut at 96 tokens (364 tokens;
the machine was shared by ~6 agents, load ~14 on 2 cores, so the sets are small); the Fisher pass on
8 disjoint calibration prompts (705 tokens) and, to separate the estimator's error from the prompt
sets' difference, on the sweep's own prompts. Spearman of estimate vs exact mean KL (top-10 overlap):

    scheme    draws  prompts       sequence     token        diagonal
    W4A16     2      calibration   0.894 (5)    0.955 (8)    0.958 (7)
    W4A16     2      same          0.825 (6)    0.943 (7)    0.954 (7)
    W4A16     8      calibration   0.966 (9)    0.962 (7)    0.946 (7)
    W4A16     8      same          0.951 (8)    0.968 (8)    0.956 (7)
    W4A4      2      calibration   0.897 (6)    0.953 (8)    0.969 (8)
    W4A4      2      same          0.799 (6)    0.931 (7)    0.962 (7)
    W4A4      8      calibration   0.951 (8)    0.960 (8)    0.968 (8)
    W4A4      8      same          0.947 (8)    0.967 (8)    0.970 (7)

Default (diagonal-only pass, 4 draws): W4A16 0.947 (7) on the calibration prompts, 0.956 (7) on the
sweep's; W4A4 0.969 (8) / 0.973 (8); Kendall 0.82-0.87.

Median estimate / exact on the calibration prompts: diagonal 0.98-1.02 (10-90 %: 0.76-1.36), token
0.98-1.02, sequence 1.08-1.13 (0.63-1.74 at 2 draws). On the tiny test Llama (12 groups, same prompts
as the sweep) the sequence form converges to the exact KL with draws (16 draws: Spearman 0.99-1.00,
ratio 0.98-1.04) while token / diagonal stay at 0.92 (W4A16) with ratio ~0.85-0.9. So: the sequence
form is the unbiased one but needs many draws; the diagonal form ranks as well at 2 draws as at 8 on
SmolLM2 and its scale matches the sweep there. Default: ``diagonal`` (ModelOpt's form, with sampled
labels), 4 draws.

Wall time on that machine (1 torch thread): exact sweep 677-686 s for 364 tokens and one tier
(1.9 s per token); all-forms pass 195 s (2 draws) / 511-543 s (8 draws) for 705 tokens; the default
diagonal-only pass with 4 draws 126-132 s for 705 tokens (0.18 s per token) scoring the NVFP4 and FP8
tiers at once: ~10x cheaper per token than the sweep of the NVFP4 tier alone, ~20x against sweeping
both tiers.

Cost: one forward per micro-batch and one backward (input gradients only) per label draw. All forms
(:func:`fisher_pass` default): per draw, per Linear and per weight-quantizing tier one matmul with the
quantized weight for ``Δy``; per-group sums are accumulated inside the hooks and no gradient is kept.
The diagonal form alone (:func:`score_tiers`' default) sums ``g²`` over the draws in one buffer per
Linear (``tokens × out`` floats) and computes each ``Δy`` once per micro-batch. Weights are decoded
from their checkpoint tensors when used (or once, ``cache_weights``). Memory: the model, the
checkpoint tensors of each quantizing tier (NVFP4 ~0.56 B, FP8 ~1 B per weight), and per micro-batch
(at most ``max_batch_tokens`` positions) the autograd activations plus every Linear's input and output
kept for the hooks.

Routed MoE experts (members that are slices of fused experts parameters, not ``nn.Linear``) are not
scored here: they are left out of the result, and the caller scores them with the exact sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from calibration.emulate import (
    GroupQuantization,
    QuantizedLinear,
    input_quantizer,
    linear_modules,
    quantize_group,
    quantize_groups,
)
from calibration.groups import LinearGroup, TargetSelection
from calibration.memory import release_free_memory
from calibration.observers import TokenBatch, _model_device
from calibration.precision import Tier
from calibration.tiers import GroupOptions, TierOption

logger = logging.getLogger(__name__)


class FisherForm(str, Enum):
    """Which quadratic form of the sampled-label Fisher estimates a group's KL (module docstring)."""

    SEQUENCE = "sequence"
    TOKEN = "token"
    DIAGONAL = "diagonal"


#: The form :func:`score_tiers` returns (chosen by rank agreement with the exact sweep; module doc).
DEFAULT_FORM = FisherForm.DIAGONAL
#: Token positions per forward/backward (a caller's batch is split by rows to stay under it).
DEFAULT_MAX_BATCH_TOKENS = 128


@dataclass(frozen=True)
class FisherPass:
    """Estimates of every form asked for from one pass: ``estimates[form][group][tier]`` in nats per
    token."""

    estimates: Mapping[FisherForm, Mapping[str, Mapping[Tier, float]]]
    num_tokens: int  # real token positions scored (each with ``label_draws`` labels)
    num_backward: int
    skipped_groups: tuple[str, ...] = ()  # routed-expert groups, not scored here


# ------------------------------------------------------------------------------------- tiers


def _base_tier(tiers: Sequence[Tier]) -> Tier:
    nvfp4 = [t for t in tiers if t.is_nvfp4]
    if len(nvfp4) != 1:
        raise ValueError(f"tiers need exactly one NVFP4 base tier (nvfp4 or nvfp4a16), got {tiers}")
    return nvfp4[0]


def _check_tiers(tiers: Sequence[Tier], *, need_base: bool = True) -> tuple[Tier, ...]:
    tiers = tuple(Tier(t) for t in tiers)
    if len(set(tiers)) != len(tiers):
        raise ValueError(f"a tier is listed twice: {tiers}")
    if need_base:
        _base_tier(tiers)
    return tiers


def _quantize_tier(
    model: nn.Module,
    groups: Sequence[LinearGroup],
    tier: Tier,
    input_amax: Mapping[str, float],
    rounded: Mapping | None,
) -> tuple[GroupQuantization, ...]:
    """The run's one emulation: round-to-nearest, or the rounded NVFP4 weights when given."""
    if rounded is not None and tier.is_nvfp4:
        return quantize_groups(model, groups, tier, input_amax, rounded=rounded)
    return quantize_groups(model, groups, tier, input_amax)


def tier_bytes(
    model: nn.Module,
    selection: TargetSelection,
    tiers: Sequence[Tier],
    input_amax: Mapping[str, float],
    *,
    rounded: Mapping | None = None,
    storage_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, dict[Tier, int]]:
    """Checkpoint bytes of every Linear group at every tier (``GroupQuantization.weight_bytes``; BF16
    counted in ``storage_dtype``, the dtype the export writes unquantized weights in)."""
    tiers = _check_tiers(tiers)
    groups = [g for g in selection.groups if not g.expert_slots]
    linears = linear_modules(model)
    out: dict[str, dict[Tier, int]] = {g.name: {} for g in groups}
    for tier in tiers:
        if tier is Tier.BF16:
            for group in groups:
                stored = {m: linears[m].weight.detach().to(storage_dtype) for m in group.members}
                out[group.name][tier] = quantize_group(
                    linears, group, tier, weights=stored
                ).weight_bytes
            continue
        for quantized in _quantize_tier(model, groups, tier, input_amax, rounded):
            out[quantized.group.name][tier] = quantized.weight_bytes
    return out


def group_options(
    scores: Mapping[str, Mapping[Tier, float]],
    bytes_: Mapping[str, Mapping[Tier, int]],
    exact_kl: Mapping[str, float] | None = None,
) -> list[GroupOptions]:
    """The planner's records (:class:`calibration.tiers.GroupOptions`): per group, options[0] is its
    NVFP4 tier, then the other tiers by bytes; ``exact_kl`` (group -> measured KL of the base tier
    alone) where a decision needed it. Groups in ``scores`` order; every scored tier needs bytes."""
    result = []
    for name, by_tier in scores.items():
        tiers = list(by_tier)
        base = _base_tier(tiers)
        missing = [t.value for t in tiers if t not in bytes_.get(name, {})]
        if missing:
            raise KeyError(f"{name}: no bytes for tier(s) {missing}")
        others = sorted((t for t in tiers if t is not base), key=lambda t: bytes_[name][t])
        options = tuple(
            TierOption(t, int(bytes_[name][t]), float(by_tier[t])) for t in (base, *others)
        )
        exact = None if exact_kl is None else exact_kl.get(name)
        result.append(GroupOptions(name, options, exact_kl=exact))
    return result


# ------------------------------------------------------------------------------------- the pass


@dataclass(frozen=True)
class _MemberTier:
    """How one member computes under one quantizing tier: its checkpoint tensors (decoded on use
    unless ``decoded`` is kept) and its input fake-quant."""

    layer: QuantizedLinear
    quantize_input: Callable[[torch.Tensor], torch.Tensor] | None
    decoded: torch.Tensor | None = None  # [out, in] in the model's dtype and device

    def weight(self, like: torch.Tensor) -> torch.Tensor:
        if self.decoded is not None:
            return self.decoded
        return self.layer.dequantized_weight(like.dtype).to(like.device)


class _Accumulator:
    """Per (group, tier): per-position sums of ``g·Δy`` over members for the running backward, and the
    three forms' running totals (float64 scalars on the model's device)."""

    def __init__(self, keys: Sequence[tuple[str, Tier]], device: torch.device) -> None:
        self.keys = tuple(keys)
        self.totals = {
            form: {k: torch.zeros((), dtype=torch.float64, device=device) for k in self.keys}
            for form in FisherForm
        }
        self.inner: dict[tuple[str, Tier], torch.Tensor] = {}  # [B, T] float32
        self.diagonal: dict[tuple[str, Tier], torch.Tensor] = {}  # [B, T] float32

    def add(self, key: tuple[str, Tier], inner: torch.Tensor, diagonal: torch.Tensor) -> None:
        if key in self.inner:
            self.inner[key] = self.inner[key] + inner
            self.diagonal[key] = self.diagonal[key] + diagonal
        else:
            self.inner[key], self.diagonal[key] = inner, diagonal

    def close_backward(self, mask: torch.Tensor) -> None:
        """Fold one backward's per-position sums into the totals; ``mask`` bool [B, T] real tokens."""
        weight = mask.to(torch.float64)
        for key, inner in self.inner.items():
            inner = inner.double() * weight  # [B, T]
            self.totals[FisherForm.SEQUENCE][key] += inner.sum(dim=1).square().sum()
            self.totals[FisherForm.TOKEN][key] += inner.square().sum()
            self.totals[FisherForm.DIAGONAL][key] += (self.diagonal[key].double() * weight).sum()
        self.inner.clear()
        self.diagonal.clear()

    def add_diagonal(
        self, key: tuple[str, Tier], diagonal: torch.Tensor, mask: torch.Tensor
    ) -> None:
        """Fold a diagonal-form sum (``[B, T]``, already summed over draws) into the totals."""
        self.totals[FisherForm.DIAGONAL][key] += (diagonal.double() * mask).sum()


def _micro_batches(batch: TokenBatch, max_tokens: int) -> list[tuple[int, TokenBatch]]:
    """``(first row, rows)`` of ``batch`` in chunks of at most ``max_tokens`` positions (at least one
    row each), each trimmed to its longest row (right padding: trimming changes nothing for a causal
    model)."""
    rows, width = batch.input_ids.shape
    per_chunk = max(1, max_tokens // max(width, 1))
    chunks = []
    for start in range(0, rows, per_chunk):
        ids = batch.input_ids[start : start + per_chunk]
        mask = batch.attention_mask[start : start + per_chunk]
        keep = int(mask.sum(dim=1).max())
        chunks.append((start, TokenBatch(ids[:, :keep], mask[:, :keep])))
    return chunks


def _sample_labels(
    logits: torch.Tensor, mask: torch.Tensor, draws: int, seed: int, batch: int, first_row: int
) -> torch.Tensor:
    """``draws`` labels per real position from ``softmax(logits)`` (``[R, vocab]``, rows in ``mask``
    order), each prompt row with its own generator seeded from ``(seed, batch, row)``: the labels do
    not depend on how a batch is split into forwards. Returns int64 ``[R, draws]``."""
    probs = torch.softmax(logits.detach(), dim=-1).cpu()
    labels = []
    start = 0
    for row, length in enumerate(mask.sum(dim=1).tolist()):
        generator = torch.Generator(device="cpu")
        generator.manual_seed((seed * 1_000_003 + batch) * 1_000_003 + first_row + row)
        rows = probs[start : start + length]
        labels.append(torch.multinomial(rows, draws, replacement=True, generator=generator))
        start += length
    return torch.cat(labels).to(logits.device)


def fisher_pass(
    model: nn.Module,
    batches: Sequence[TokenBatch],
    selection: TargetSelection,
    tiers: Sequence[Tier],
    input_amax: Mapping[str, float],
    *,
    rounded: Mapping | None = None,
    label_draws: int = 4,
    seed: int = 0,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    cache_weights: bool = False,
    forms: Sequence[FisherForm] | None = None,
    progress: bool = False,
) -> FisherPass:
    """One Fisher pass over ``batches``: each of ``forms`` estimated for every Linear group and tier.

    Preconditions: ``tiers`` are distinct (several NVFP4 tiers may be scored in one pass; the
    planner's records take one, :func:`group_options`); W4A4 (nvfp4) needs ``input_amax[group]`` for
    every group; ``rounded`` (group -> rounded NVFP4 weights, :mod:`calibration.rounding`) goes to
    :func:`calibration.emulate.quantize_groups` for the NVFP4 tier. The model is left as it was
    (parameters' ``requires_grad`` restored, hooks removed).

    Labels: ``label_draws`` draws per real position from the model's next-token distribution, with a
    generator per prompt seeded from ``(seed, batch index, row)``: same inputs, same result, however
    ``max_batch_tokens`` splits the batches (up to float summation order). ``cache_weights`` keeps
    every member's decoded weight at every quantizing tier (``tiers × Linear params`` in the model's
    dtype) instead of decoding it at each use: faster, more memory. ``forms`` (default: all) limits
    what is estimated; the diagonal form alone sums ``g²`` over the draws (one ``[B, T, out]`` buffer
    per Linear) and computes each ``Δy`` once per micro-batch instead of once per draw.
    """
    tiers = _check_tiers(tiers, need_base=False)
    forms = (
        tuple(FisherForm) if forms is None else tuple(dict.fromkeys(FisherForm(f) for f in forms))
    )
    if label_draws < 1:
        raise ValueError(f"label_draws must be >= 1, got {label_draws}")
    if not batches:
        raise ValueError("no calibration batches")
    groups = [g for g in selection.groups if not g.expert_slots]
    skipped = tuple(g.name for g in selection.groups if g.expert_slots)
    if skipped:
        logger.warning(
            "%d routed-expert group(s) are not scored by the Fisher pass (e.g. %s); use the exact "
            "sweep for them",
            len(skipped),
            skipped[0],
        )
    device = _model_device(model)
    linears = linear_modules(model)
    quantizing = [t for t in tiers if t.quantizes_weights]

    # checkpoint tensors and input quantizers of every member at every quantizing tier
    plan: dict[str, list[tuple[tuple[str, Tier], _MemberTier]]] = {
        m: [] for g in groups for m in g.members
    }
    for tier in quantizing:
        for quantized in _quantize_tier(model, groups, tier, input_amax, rounded):
            for layer in quantized.members:
                weight = linears[layer.name].weight
                decoded = (
                    layer.dequantized_weight(weight.dtype).to(weight.device)
                    if cache_weights
                    else None
                )
                quantize = input_quantizer(tier, layer.input_global_scale)
                plan[layer.name].append(
                    ((quantized.group.name, tier), _MemberTier(layer, quantize, decoded))
                )
    acc = _Accumulator([(g.name, t) for g in groups for t in quantizing], device)
    # diagonal form alone: sum g² over the draws, then one Δy per member and tier per micro-batch
    diagonal_only = forms == (FisherForm.DIAGONAL,)
    saved: dict[str, torch.Tensor] = {}  # member -> input (q/k/v and gate/up share one tensor)
    grad_squares: dict[str, torch.Tensor] = {}  # member -> Σ_draws g² [B, T, out]

    def unquantized_output(member: str, x: torch.Tensor) -> torch.Tensor:
        """Recomputed rather than kept: holding every Linear's output until the backward would
        double the pass's memory."""
        return F.linear(x, linears[member].weight, linears[member].bias)

    def output_change(member: str, how: _MemberTier, x: torch.Tensor, y: torch.Tensor):
        linear = linears[member]
        xq = x if how.quantize_input is None else how.quantize_input(x)
        return F.linear(xq, how.weight(linear.weight), linear.bias).float() - y.float()

    def grad_hook(member: str, x: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                g = grad.float()  # [B, T, out]
                if diagonal_only:
                    previous = grad_squares.get(member)
                    grad_squares[member] = g.square() if previous is None else previous + g.square()
                    return
                y = unquantized_output(member, x)
                for key, how in plan[member]:
                    product = g * output_change(member, how, x, y)
                    acc.add(key, product.sum(-1), product.square().sum(-1))

        return hook

    def forward_hook(member: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                x = args[0].detach()
                if diagonal_only:
                    saved[member] = x
                output.register_hook(grad_hook(member, x))

        return hook

    @torch.no_grad()
    def close_diagonal(mask: torch.Tensor) -> None:
        weight = mask.to(torch.float64)
        for member, x in saved.items():
            squares = grad_squares.get(member)
            if squares is None:
                continue  # the output did not reach the loss
            y = unquantized_output(member, x)
            for key, how in plan[member]:
                diagonal = (squares * output_change(member, how, x, y).square()).sum(-1)
                acc.add_diagonal(key, diagonal, weight)
        saved.clear()
        grad_squares.clear()

    def embeddings_require_grad(_module: nn.Module, _args: tuple, output: torch.Tensor):
        return output.detach().requires_grad_()

    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    handles = []
    num_tokens = num_backward = 0
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(embeddings_require_grad))
        handles.extend(linears[m].register_forward_hook(forward_hook(m)) for m in plan)
        chunks = [
            (b, first_row, chunk)
            for b, batch in enumerate(batches)
            for first_row, chunk in _micro_batches(batch, max_batch_tokens)
        ]
        for batch_index, first_row, tokens in tqdm(
            chunks, desc="Fisher pass", unit="batch", disable=not progress
        ):
            tokens = tokens.to(device)
            mask = tokens.attention_mask.bool()
            with torch.enable_grad():
                out = model(
                    input_ids=tokens.input_ids,
                    attention_mask=tokens.attention_mask,
                    use_cache=False,
                )
                logits = out.logits[mask].float()  # [R, vocab]
                del out
                labels = _sample_labels(logits, mask, label_draws, seed, batch_index, first_row)
                for draw in range(label_draws):
                    loss = F.cross_entropy(logits, labels[:, draw], reduction="sum")
                    loss.backward(retain_graph=draw < label_draws - 1)
                    if not diagonal_only:
                        acc.close_backward(mask)
                    num_backward += 1
                if diagonal_only:
                    close_diagonal(mask)
            num_tokens += int(mask.sum())
            del logits, labels, loss
            release_free_memory()
    finally:
        saved.clear()
        grad_squares.clear()
        for handle in handles:
            handle.remove()
        for name, param in model.named_parameters():
            param.requires_grad_(saved_flags[name])

    scale = 0.5 / (num_tokens * label_draws)
    estimates = {
        form: {
            g.name: {
                t: (float(acc.totals[form][(g.name, t)]) * scale if t.quantizes_weights else 0.0)
                for t in tiers
            }
            for g in groups
        }
        for form in forms
    }
    return FisherPass(estimates, num_tokens, num_backward, skipped)


def score_tiers(
    model: nn.Module,
    batches: Sequence[TokenBatch],
    selection: TargetSelection,
    tiers: Sequence[Tier],
    input_amax: Mapping[str, float],
    *,
    rounded: Mapping | None = None,
    label_draws: int = 4,
    seed: int = 0,
    progress: bool = False,
    form: FisherForm = DEFAULT_FORM,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    cache_weights: bool = False,
) -> dict[str, dict[Tier, float]]:
    """Estimated KL (nats per token) of quantizing each Linear group alone at each of ``tiers`` (one
    NVFP4 base tier, nvfp4 or nvfp4a16, plus any of fp8 / bf16): ``{group: {tier: estimate}}`` in
    model order, BF16 = 0. See :func:`fisher_pass`."""
    _check_tiers(tiers)
    result = fisher_pass(
        model,
        batches,
        selection,
        tiers,
        input_amax,
        rounded=rounded,
        label_draws=label_draws,
        seed=seed,
        max_batch_tokens=max_batch_tokens,
        cache_weights=cache_weights,
        forms=(form,),
        progress=progress,
    )
    return {name: dict(by_tier) for name, by_tier in result.estimates[FisherForm(form)].items()}
