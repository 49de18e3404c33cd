"""Replay evaluator: baseline vs candidate on held-out logged prompts, per request.

The in-process canary of DESIGN.md: each held-out prompt (already redacted) is run through the baseline
and the candidate model on CPU (teacher-forced over the prompt tokens, one forward each) and one frozen
:class:`ReplayRecord` is kept per request:

* ``latency_*_s``: wall seconds of each model's forward. The order alternates per request (even index:
  baseline first, odd: candidate first) so slow drift of a shared machine cancels between the sides.
* ``kl_mean`` / ``kl_p99``: next-token ``KL(P_base ‖ P_cand)`` in nats over the request's positions.
* ``top1_agreement``: share of positions whose argmax agrees.
* ``nll_baseline`` / ``nll_candidate``: mean NLL (nats/token) of the prompt tokens 1..T-1 under each model
  (``exp`` of their difference is the perplexity ratio).
* ``outlier_fallback_rate_*``: share of (token, W4A4 layer) pairs whose input row has an element beyond
  the layer's calibrated range, ``|x| > 448 * 6 / input_global_scale`` (the stored static input amax):
  how often a quantized matmul would need its outlier fallback. (Counting a token once if ANY of the
  ~200 layers of a model exceeds its range would grow with depth and says little per layer.)

Records are saved/loaded as strict JSON (:func:`save_replay` / :func:`load_replay`, NaN stored as
``null``) because Prefect tasks pass paths, never tensors. Which requests a canary stage replays and
how a result becomes the judge's samples live with the canary (``pipelines/canary.py``).

A remote evaluator (mirrored traffic to two OpenAI-compatible endpoints, e.g. vLLM) implements the same
:class:`CanaryEvaluator` protocol: it fills the same records (latency from the two HTTP calls, KL and
top-1 from ``top_logprobs`` of the prompt positions, NLL from ``prompt_logprobs``; the outlier rate from
the server's metrics or NaN = missing) and every consumer downstream stays unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from calibration import atomic
from calibration.prompts import Prompt, PromptError, RenderedPrompt, encode_prompt, render_prompt
from kernels.formats import FP4_E2M1_MAX, FP8_E4M3_MAX

logger = logging.getLogger(__name__)

REPLAY_FORMAT = "fp4roll.replay"
REPLAY_FORMAT_VERSION = 1

#: What :func:`replay` accepts for a model: a module, ``(model, tokenizer, ...)`` as the loaders return,
#: a model folder (plain HF or our NVFP4 checkpoint), or a zero-argument callable returning any of those.
ModelSource = nn.Module | tuple | str | os.PathLike | Callable[[], Any]


class ReplayError(ValueError):
    """The replay cannot run on these inputs (mismatched vocabularies, no prompts, bad sizes...)."""


@dataclass(frozen=True)
class ReplayRecord:
    """One replayed request. Metrics are NaN when the request failed (``error`` says why)."""

    request_index: int  # position in the hold-out window
    prompt_digest: str  # sha256 of the rendered prompt text (never the text itself)
    num_tokens: int  # prompt tokens after truncation
    latency_baseline_s: float
    latency_candidate_s: float
    kl_mean: float  # nats, mean over the num_tokens positions
    kl_p99: float  # nats, p99 over the positions (linear interpolation)
    top1_agreement: float  # share of positions with equal argmax
    nll_baseline: float  # nats/token over tokens 1..num_tokens-1 (NaN when num_tokens < 2)
    nll_candidate: float
    outlier_fallback_rate_baseline: float  # share of (token, W4A4 layer) pairs beyond the range
    outlier_fallback_rate_candidate: float
    error: str | None = None
    # Which side failed when ``error`` is set: "baseline", "candidate" or "both" (None = both).
    failed_side: str | None = None
    # Filled by endpoint evaluators (NaN / None / empty in process):
    route: str | None = None  # the logged request's route (per-route judging)
    ttft_baseline_s: float = math.nan  # time to first streamed token of the greedy generation
    ttft_candidate_s: float = math.nan
    tpot_baseline_s: float = math.nan  # seconds per output token after the first
    tpot_candidate_s: float = math.nan
    attempts: int = 1  # HTTP attempts spent on this request (retries included), both sides
    task: Mapping[str, float] = field(default_factory=dict)  # task metrics of the generations

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def candidate_failed(self) -> bool:
        """The candidate side failed (a baseline-only failure is not the candidate's error)."""
        return self.error is not None and self.failed_side in (None, "both", "candidate")

    @property
    def baseline_failed(self) -> bool:
        return self.error is not None and self.failed_side in (None, "both", "baseline")


@dataclass(frozen=True)
class ReplayResult:
    """Per-request records of one replay plus what produced them."""

    records: tuple[ReplayRecord, ...]
    baseline_name: str
    candidate_name: str
    seed: int
    max_len: int
    batch_size: int
    outlier_layers_baseline: tuple[str, ...] = ()  # W4A4 layers watched for out-of-range inputs
    outlier_layers_candidate: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_errors(self) -> int:
        return sum(not r.ok for r in self.records)

    def summary(self) -> dict[str, float]:
        """Mean of each metric over the successful requests (for logs and MLflow metrics)."""
        good = [r for r in self.records if r.ok]

        def mean(values: list[float]) -> float:
            finite = [v for v in values if math.isfinite(v)]
            return sum(finite) / len(finite) if finite else math.nan

        return {
            "requests": float(len(self.records)),
            "errors": float(self.num_errors),
            "kl_mean": mean([r.kl_mean for r in good]),
            "kl_p99": mean([r.kl_p99 for r in good]),
            "top1_agreement": mean([r.top1_agreement for r in good]),
            "nll_baseline": mean([r.nll_baseline for r in good]),
            "nll_candidate": mean([r.nll_candidate for r in good]),
            "outlier_fallback_rate": mean([r.outlier_fallback_rate_candidate for r in good]),
            "latency_baseline_s": mean([r.latency_baseline_s for r in good]),
            "latency_candidate_s": mean([r.latency_candidate_s for r in good]),
        }


class CanaryEvaluator(Protocol):
    """What a canary stage needs: replay ``prompts`` (the stage's requests) and return the records.

    ``request_indices`` are the prompts' positions in the hold-out window (kept in the records).
    The in-process implementation is :class:`InProcessEvaluator`; a mirrored-traffic one would send
    each prompt to two OpenAI-compatible endpoints instead.
    """

    def __call__(
        self, prompts: Sequence[Prompt], *, request_indices: Sequence[int] | None = None
    ) -> ReplayResult: ...


# --------------------------------------------------------------------------------------- prompts


def _encode(tokenizer: Any, prompt: Prompt | RenderedPrompt, max_len: int) -> tuple[list[int], str]:
    """Token ids of the prompt as the server sees it, and the sha256 of that rendered text."""
    try:
        rendered = render_prompt(tokenizer, prompt)
    except PromptError as exc:
        raise ReplayError(str(exc)) from exc
    encoded = encode_prompt(tokenizer, rendered, max_len)
    digest = hashlib.sha256(rendered.text.encode("utf-8")).hexdigest()
    return list(encoded.input_ids), digest


# --------------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class _Loaded:
    model: nn.Module
    tokenizer: Any
    name: str
    input_ranges: Mapping[str, float] | None = None  # from a loader's info, when it gives one


def load_model_dir(path: str | os.PathLike) -> tuple[nn.Module, Any, Any]:
    """``(model, tokenizer, info)`` from a folder: our NVFP4 checkpoint (``quantization_config`` in
    ``config.json``; W4A4 loaded with activation fake-quant, ``info.input_global_scales`` set) or a
    plain Hugging Face model (``info`` is the folder)."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ReplayError(f"{folder}: no config.json; not a model folder")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("quantization_config"):
        from calibration.checkpoint import load_checkpoint

        return load_checkpoint(folder)
    from calibration.models import load_causal_lm

    loaded = load_causal_lm(folder)
    return loaded.model, loaded.tokenizer, folder


def ranges_from_input_global_scales(scales: Mapping[str, float]) -> dict[str, float]:
    """``{layer: 448*6 / input_global_scale}``: the calibrated input amax of each W4A4 layer."""
    ranges = {}
    for name, scale in scales.items():
        value = float(torch.as_tensor(scale, dtype=torch.float32).reshape(-1)[0])
        if not (math.isfinite(value) and value > 0):
            raise ReplayError(f"{name}: input_global_scale {value} is not a positive finite number")
        ranges[name] = FP8_E4M3_MAX * FP4_E2M1_MAX / value
    return ranges


def load_source(source: ModelSource) -> nn.Module | tuple:
    """Load a folder or call a loader; a module or tuple is returned as is (for reuse across calls)."""
    if isinstance(source, (str, os.PathLike)):
        return load_model_dir(source)
    if callable(source) and not isinstance(source, nn.Module):
        return source()
    return source


def _resolve(source: ModelSource, role: str) -> _Loaded:
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        name = str(getattr(config, "name_or_path", "") or type(source).__name__)
        return _Loaded(source, None, name)
    if isinstance(source, tuple):
        if not source or not isinstance(source[0], nn.Module):
            raise ReplayError(f"{role}: a tuple source must start with the model")
        loaded = _resolve(source[0], role)
        tokenizer = source[1] if len(source) > 1 else None
        # (model, tokenizer, CheckpointInfo): its input_global_scales name the W4A4 layers
        scales = getattr(source[2], "input_global_scales", None) if len(source) > 2 else None
        ranges = ranges_from_input_global_scales(scales) if scales else None
        name = loaded.name
        if len(source) > 2:
            origin = source[2] if isinstance(source[2], os.PathLike) else None
            origin = origin or getattr(source[2], "path", None)
            name = str(origin) if origin else name
        return _Loaded(loaded.model, tokenizer, name, ranges)
    if isinstance(source, (str, os.PathLike)):
        loaded = _resolve(load_model_dir(source), role)
        return replace(loaded, name=str(source))
    if callable(source):
        loaded = _resolve(source(), role)
        name = getattr(source, "__name__", None)
        return loaded if name in (None, "<lambda>") else replace(loaded, name=name)
    raise ReplayError(f"{role}: cannot use a {type(source).__name__} as a model source")


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------- outliers


def calibrated_input_ranges(model: nn.Module) -> dict[str, float]:
    """``{module name: calibrated input amax}`` of every W4A4 layer, i.e. every module carrying a
    positive finite ``input_global_scale`` (the compressed-tensors attribute): ``448*6 / igs``."""
    ranges: dict[str, float] = {}
    for name, module in model.named_modules():
        scale = getattr(module, "input_global_scale", None)
        if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
            continue
        value = float(scale.detach().float().reshape(()))
        if math.isfinite(value) and value > 0:
            ranges[name] = FP8_E4M3_MAX * FP4_E2M1_MAX / value
    return ranges


class _OutlierWatch:
    """Forward pre-hooks (run before any fake-quant hook) counting, per token, the watched layers whose
    input exceeds their calibrated range. ``token_share``: float ``[batch, seq]`` = that count divided
    by the number of watched layers (0 = no layer clipped this token, 1 = every layer did)."""

    def __init__(self, model: nn.Module, ranges: Mapping[str, float]) -> None:
        modules = dict(model.named_modules())
        self.num_layers = len(ranges)
        self.counts: torch.Tensor | None = None  # int32 [batch, seq]: layers beyond range
        self._handles = [
            modules[name].register_forward_pre_hook(self._hook(limit), prepend=True)
            for name, limit in ranges.items()
        ]

    def _hook(self, limit: float):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.dim() < 2:
                return
            beyond = (x.detach().abs() > limit).any(dim=-1).to(torch.int32)  # [batch, seq]
            if self.counts is None or self.counts.shape != beyond.shape:
                self.counts = beyond
            else:
                self.counts = self.counts + beyond

        return hook

    @property
    def token_share(self) -> torch.Tensor | None:
        if self.counts is None or not self.num_layers:
            return None
        return self.counts.float() / self.num_layers

    def reset(self) -> None:
        self.counts = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class _PositionMetrics:
    kl: torch.Tensor  # float32 [T]
    agree: torch.Tensor  # bool [T]
    nll_baseline: torch.Tensor  # float32 [T-1]
    nll_candidate: torch.Tensor  # float32 [T-1]


@torch.inference_mode()
def compare_logits(
    logits_baseline: torch.Tensor,
    logits_candidate: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    chunk_positions: int = 64,
) -> _PositionMetrics:
    """Per-position KL(P_base ‖ P_cand), top-1 agreement and NLL of the next prompt token.

    ``logits_*``: ``[T, V]`` (any float dtype), ``token_ids``: int64 ``[T]``. Worked through in chunks
    of ``chunk_positions`` so the float32 softmax copies stay ``chunk × V`` (vocab 49 152 → 12 MB).
    """
    if logits_baseline.shape != logits_candidate.shape:
        raise ReplayError(
            f"baseline logits {tuple(logits_baseline.shape)} and candidate logits "
            f"{tuple(logits_candidate.shape)} differ; the models must share a vocabulary"
        )
    num_positions = logits_baseline.shape[0]
    kl, agree, nll_b, nll_c = [], [], [], []
    for start in range(0, num_positions, chunk_positions):
        stop = min(start + chunk_positions, num_positions)
        log_p = torch.log_softmax(logits_baseline[start:stop].float(), dim=-1)  # [c, V]
        log_q = torch.log_softmax(logits_candidate[start:stop].float(), dim=-1)  # [c, V]
        kl.append((log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0))
        agree.append(log_p.argmax(dim=-1) == log_q.argmax(dim=-1))
        # position t predicts token t + 1: only positions < T - 1 have a target
        target_stop = min(stop, num_positions - 1)
        if target_stop > start:
            targets = token_ids[start + 1 : target_stop + 1].unsqueeze(-1)  # [c', 1]
            nll_b.append(-log_p[: target_stop - start].gather(-1, targets).squeeze(-1))
            nll_c.append(-log_q[: target_stop - start].gather(-1, targets).squeeze(-1))
    empty = torch.empty(0, dtype=torch.float32)
    return _PositionMetrics(
        kl=torch.cat(kl),
        agree=torch.cat(agree),
        nll_baseline=torch.cat(nll_b) if nll_b else empty,
        nll_candidate=torch.cat(nll_c) if nll_c else empty,
    )


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else math.nan


# --------------------------------------------------------------------------------------- replay


class _Side:
    """One model under replay: forward with timing and outlier tracking."""

    def __init__(self, loaded: _Loaded, ranges: Mapping[str, float] | None) -> None:
        self.model = loaded.model
        self.name = loaded.name
        self.device = _model_device(loaded.model)
        if ranges is None:
            ranges = loaded.input_ranges
        if ranges is None:
            ranges = calibrated_input_ranges(loaded.model)
        self.ranges = dict(ranges)
        self.watch = _OutlierWatch(loaded.model, self.ranges) if self.ranges else None
        self.was_training = loaded.model.training
        loaded.model.eval()

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, float, torch.Tensor | None]:
        """``(logits [B, T, V] on CPU, wall seconds, per-token share of layers beyond range [B, T] or None)``."""
        if self.watch is not None:
            self.watch.reset()
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device)
        start = time.perf_counter()
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=False)
        elapsed = time.perf_counter() - start
        logits = out.logits if hasattr(out, "logits") else out[0]
        outliers = None
        if self.watch is not None and self.watch.token_share is not None:
            outliers = self.watch.token_share.reshape(input_ids.shape).cpu()
        return logits.detach().cpu(), elapsed, outliers

    def close(self) -> None:
        if self.watch is not None:
            self.watch.remove()
        self.model.train(self.was_training)


def failed_record(
    index: int, digest: str, num_tokens: int, error: str, **fields: Any
) -> ReplayRecord:
    """A request that failed: every metric NaN, the error kept (``fields``: e.g. ``failed_side``,
    ``route``, ``attempts``); the error-rate gate counts it."""
    nan = math.nan
    return ReplayRecord(
        request_index=index,
        prompt_digest=digest,
        num_tokens=num_tokens,
        latency_baseline_s=nan,
        latency_candidate_s=nan,
        kl_mean=nan,
        kl_p99=nan,
        top1_agreement=nan,
        nll_baseline=nan,
        nll_candidate=nan,
        outlier_fallback_rate_baseline=nan,
        outlier_fallback_rate_candidate=nan,
        error=error,
        **fields,
    )


def replay(
    baseline: ModelSource,
    candidate: ModelSource,
    prompts: Sequence[Prompt],
    *,
    tokenizer: Any = None,
    max_len: int = 256,
    batch_size: int = 1,
    seed: int = 0,
    warmup: int = 1,
    request_indices: Sequence[int] | None = None,
    input_ranges_baseline: Mapping[str, float] | None = None,
    input_ranges_candidate: Mapping[str, float] | None = None,
    chunk_positions: int = 64,
) -> ReplayResult:
    """Replay ``prompts`` through ``baseline`` and ``candidate`` (in process) and measure each request.

    Preconditions: both models share the tokenizer's vocabulary; ``tokenizer`` defaults to the one a
    source came with (a folder or a loader returning ``(model, tokenizer, ...)``). ``batch_size=1``
    gives per-request latency; with a larger batch each request gets the batch time / batch size.
    ``request_indices`` (default ``0..n-1``) are the prompts' positions in the hold-out window.
    W4A4 layers to watch for outliers (``{layer: calibrated input amax}``): ``input_ranges_*`` if
    given (``{}`` disables tracking), else the loader info's ``input_global_scales``, else modules
    carrying an ``input_global_scale`` tensor. Requests whose forward raises are kept as error records (NaN
    metrics) and the replay goes on; tokenizer or vocabulary mismatches raise :class:`ReplayError`.
    """
    if max_len < 1 or batch_size < 1 or chunk_positions < 1:
        raise ReplayError(
            f"max_len, batch_size and chunk_positions must be >= 1, got {max_len}, {batch_size}, "
            f"{chunk_positions}"
        )
    if not prompts:
        raise ReplayError("no prompts to replay")
    if request_indices is None:
        request_indices = range(len(prompts))
    if len(request_indices) != len(prompts):
        raise ReplayError(
            f"{len(request_indices)} request indices for {len(prompts)} prompts; they must pair up"
        )
    torch.manual_seed(seed)
    base_loaded = _resolve(baseline, "baseline")
    cand_loaded = base_loaded if candidate is baseline else _resolve(candidate, "candidate")
    tokenizer = tokenizer or base_loaded.tokenizer or cand_loaded.tokenizer
    if tokenizer is None:
        raise ReplayError("no tokenizer: pass tokenizer= or sources that come with one")
    base_vocab = base_loaded.model.get_output_embeddings()
    cand_vocab = cand_loaded.model.get_output_embeddings()
    if (
        base_vocab is not None
        and cand_vocab is not None
        and base_vocab.weight.shape[0] != cand_vocab.weight.shape[0]
    ):
        raise ReplayError(
            f"baseline vocabulary {base_vocab.weight.shape[0]} != candidate vocabulary "
            f"{cand_vocab.weight.shape[0]}"
        )

    encoded = [_encode(tokenizer, prompt, max_len) for prompt in prompts]
    base_side = _Side(base_loaded, input_ranges_baseline)
    cand_side = (
        base_side if cand_loaded is base_loaded else _Side(cand_loaded, input_ranges_candidate)
    )
    logger.info(
        "replaying %d requests: baseline %s vs candidate %s (W4A4 layers watched: %d / %d)",
        len(prompts),
        base_side.name,
        cand_side.name,
        len(base_side.ranges),
        len(cand_side.ranges),
    )
    records: list[ReplayRecord] = []
    try:
        warm = [ids for ids, _ in encoded if ids][:warmup]
        for ids in warm:  # first calls pay one-off allocation costs; keep them out of the figures
            batch = torch.tensor([ids], dtype=torch.long)
            base_side.forward(batch, torch.ones_like(batch))
            cand_side.forward(batch, torch.ones_like(batch))
        for start in range(0, len(encoded), batch_size):
            chunk = list(
                zip(
                    request_indices[start : start + batch_size],
                    encoded[start : start + batch_size],
                    strict=True,
                )
            )
            records.extend(
                _replay_batch(
                    chunk,
                    base_side,
                    cand_side,
                    baseline_first=(start // batch_size) % 2 == 0,
                    chunk_positions=chunk_positions,
                )
            )
    finally:
        base_side.close()
        if cand_side is not base_side:
            cand_side.close()
    result = ReplayResult(
        records=tuple(records),
        baseline_name=base_side.name,
        candidate_name=cand_side.name,
        seed=seed,
        max_len=max_len,
        batch_size=batch_size,
        outlier_layers_baseline=tuple(base_side.ranges),
        outlier_layers_candidate=tuple(cand_side.ranges),
    )
    if result.num_errors:
        logger.warning("%d of %d requests failed", result.num_errors, len(records))
    logger.info("replay summary: %s", result.summary())
    return result


def _replay_batch(
    chunk: list[tuple[int, tuple[list[int], str]]],
    base_side: _Side,
    cand_side: _Side,
    *,
    baseline_first: bool,
    chunk_positions: int,
) -> list[ReplayRecord]:
    valid = [(index, ids, digest) for index, (ids, digest) in chunk if ids]
    records = {
        index: failed_record(index, digest, 0, "prompt produced no tokens")
        for index, (ids, digest) in chunk
        if not ids
    }
    if valid:
        width = max(len(ids) for _, ids, _ in valid)
        input_ids = torch.zeros(len(valid), width, dtype=torch.long)  # right-padded [B, T]
        attention_mask = torch.zeros(len(valid), width, dtype=torch.long)
        for row, (_, ids, _) in enumerate(valid):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        try:
            if baseline_first:
                base_out = base_side.forward(input_ids, attention_mask)
                cand_out = cand_side.forward(input_ids, attention_mask)
            else:
                cand_out = cand_side.forward(input_ids, attention_mask)
                base_out = base_side.forward(input_ids, attention_mask)
        except Exception as exc:
            logger.exception("forward failed for requests %s", [i for i, _, _ in valid])
            message = f"{type(exc).__name__}: {exc}"
            for index, ids, digest in valid:
                records[index] = failed_record(index, digest, len(ids), message)
        else:
            for row, (index, ids, digest) in enumerate(valid):
                records[index] = _record(
                    index, digest, ids, row, base_out, cand_out, len(valid), chunk_positions
                )
    return [records[index] for index, _ in chunk]


def _record(
    index: int,
    digest: str,
    ids: list[int],
    row: int,
    base_out: tuple[torch.Tensor, float, torch.Tensor | None],
    cand_out: tuple[torch.Tensor, float, torch.Tensor | None],
    batch_rows: int,
    chunk_positions: int,
) -> ReplayRecord:
    length = len(ids)
    base_logits, base_seconds, base_outliers = base_out
    cand_logits, cand_seconds, cand_outliers = cand_out
    metrics = compare_logits(
        base_logits[row, :length],
        cand_logits[row, :length],
        torch.tensor(ids, dtype=torch.long),
        chunk_positions=chunk_positions,
    )
    finite = bool(torch.isfinite(metrics.kl).all()) and bool(
        torch.isfinite(metrics.nll_candidate).all()
    )

    def outlier_rate(mask: torch.Tensor | None) -> float:
        return 0.0 if mask is None else float(mask[row, :length].float().mean())

    return ReplayRecord(
        request_index=index,
        prompt_digest=digest,
        num_tokens=length,
        latency_baseline_s=base_seconds / batch_rows,
        latency_candidate_s=cand_seconds / batch_rows,
        kl_mean=_mean(metrics.kl),
        kl_p99=float(torch.quantile(metrics.kl.double(), 0.99)),
        top1_agreement=_mean(metrics.agree.float()),
        nll_baseline=_mean(metrics.nll_baseline),
        nll_candidate=_mean(metrics.nll_candidate),
        outlier_fallback_rate_baseline=outlier_rate(base_outliers),
        outlier_fallback_rate_candidate=outlier_rate(cand_outliers),
        error=None if finite else "non-finite logits",
    )


@dataclass(frozen=True)
class InProcessEvaluator:
    """:class:`CanaryEvaluator` running both models in this process (see :func:`replay`)."""

    baseline: ModelSource
    candidate: ModelSource
    tokenizer: Any = None
    max_len: int = 256
    batch_size: int = 1
    seed: int = 0

    def preload(self) -> InProcessEvaluator:
        """A copy whose sources are loaded once (folders/callables → ``(model, tokenizer, info)``),
        so several stages reuse the same models."""
        return replace(
            self, baseline=load_source(self.baseline), candidate=load_source(self.candidate)
        )

    def __call__(
        self, prompts: Sequence[Prompt], *, request_indices: Sequence[int] | None = None
    ) -> ReplayResult:
        return replay(
            self.baseline,
            self.candidate,
            prompts,
            tokenizer=self.tokenizer,
            max_len=self.max_len,
            batch_size=self.batch_size,
            seed=self.seed,
            request_indices=request_indices,
        )


# --------------------------------------------------------------------------------------- JSON


def _json_float(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def replay_to_dict(result: ReplayResult) -> dict[str, Any]:
    """Strict-JSON-ready dict (non-finite floats become ``None``)."""
    data = asdict(result)
    data["records"] = [
        {
            k: ({t: _json_float(x) for t, x in v.items()} if k == "task" else _json_float(v))
            for k, v in rec.items()
        }
        for rec in data["records"]
    ]
    data["outlier_layers_baseline"] = list(result.outlier_layers_baseline)
    data["outlier_layers_candidate"] = list(result.outlier_layers_candidate)
    data["metadata"] = dict(result.metadata)
    return {"format": REPLAY_FORMAT, "version": REPLAY_FORMAT_VERSION, **data}


def replay_from_dict(data: Mapping[str, Any]) -> ReplayResult:
    """Inverse of :func:`replay_to_dict`; raises :class:`ReplayError` on a foreign or newer file."""
    if data.get("format") != REPLAY_FORMAT:
        raise ReplayError(f"not a replay result (format {data.get('format')!r})")
    if data.get("version") != REPLAY_FORMAT_VERSION:
        raise ReplayError(
            f"replay result version {data.get('version')!r}; this code reads {REPLAY_FORMAT_VERSION}"
        )
    record_fields = {f.name for f in fields(ReplayRecord)}
    float_fields = {f.name for f in fields(ReplayRecord) if f.type == "float"}
    records = []
    for position, raw in enumerate(data["records"]):
        unknown = set(raw) - record_fields
        if unknown:
            raise ReplayError(f"record {position}: unknown fields {sorted(unknown)}")
        values = {k: (math.nan if v is None and k in float_fields else v) for k, v in raw.items()}
        if "task" in values:
            values["task"] = {
                t: math.nan if x is None else float(x) for t, x in (values["task"] or {}).items()
            }
        records.append(ReplayRecord(**values))
    return ReplayResult(
        records=tuple(records),
        baseline_name=str(data["baseline_name"]),
        candidate_name=str(data["candidate_name"]),
        seed=int(data["seed"]),
        max_len=int(data["max_len"]),
        batch_size=int(data["batch_size"]),
        outlier_layers_baseline=tuple(data.get("outlier_layers_baseline", ())),
        outlier_layers_candidate=tuple(data.get("outlier_layers_candidate", ())),
        metadata=dict(data.get("metadata", {})),
    )


def save_replay(result: ReplayResult, path: str | os.PathLike) -> Path:
    """Write ``result`` as strict JSON, atomically (:func:`calibration.atomic.write_text`)."""
    return atomic.write_text(path, json.dumps(replay_to_dict(result), indent=1, allow_nan=False))


def load_replay(path: str | os.PathLike) -> ReplayResult:
    """Read a result written by :func:`save_replay`."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"replay result not found: {source}")
    return replay_from_dict(json.loads(source.read_text(encoding="utf-8")))
