"""Calibration end to end, in one call or in file-backed stages.

rounding (GPTQ / MSE block scales, one sequential pass over every calibration prompt that also
observes each group's input amax) → cheap sensitivity (one Fisher pass scores every group at every tier) → exact KL of the groups
near the runbook floor (only where the floor decision depends on it) → tier plan (NVFP4 / FP8 / BF16 by
KL removed per extra byte, within the bytes budget; with a target, the fewest bytes whose *measured*
combined KL reaches it) → export of exactly the measured plan, with ``calibration.json`` and the KL
chart inside the checkpoint folder.

* :func:`recalibrate` — everything in one process (one model load).
* The stages the Prefect flow runs as separate tasks, passing only paths (a rerun resumes from the
  last finished stage; the exact checks can fan out over threads, processes or a Dask cluster):
  :func:`calibrate_files` → :func:`score_file` → :func:`exact_candidates`
  → :func:`sweep_file` (one per subset) → :func:`plan_and_export`. Each writes its output atomically
  and returns it unchanged when it already exists.

Prompts are :class:`~calibration.prompts.RenderedPrompt` (what the server sees; a ``str`` is a plain
prompt), already redacted. Statistics, rounding and the Fisher pass use the calibration prompts; the
exact checks and every measured plan use the disjoint sensitivity prompts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
from pydantic import BaseModel, ConfigDict
from torch import nn

from calibration import atomic
from calibration.checkpoint import checkpoint_bytes_by_tier, export_checkpoint
from calibration.config import CalibrationConfig
from calibration.emulate import GroupQuantization, quantize_groups, selection_groups
from calibration.fisher import score_tiers
from calibration.groups import LinearGroup, TargetSelection, select_targets
from calibration.memory import release_free_memory
from calibration.models import load_causal_lm
from calibration.observers import (
    DEFAULT_MAX_BATCH_TOKENS,
    ActivationStats,
    collect_activation_stats,
    tokenize_prompts,
)
from calibration.precision import Rounding, Tier
from calibration.prompts import RenderedPrompt
from calibration.report import (
    CALIBRATION_JSON,
    KL_CHART_PNG,
    GroupDecision,
    PlanProbe,
    PlanSummary,
    build_calibration_record,
    render_kl_chart,
)
from calibration.rounding import (
    RoundedGroup,
    load_rounded,
    observes_every_input,
    round_and_observe,
    round_model,
    save_rounded,
)
from calibration.sensitivity import (
    Baseline,
    GroupSensitivity,
    QualityScore,
    blocks_to_cache,
    compute_baseline,
    merge_sensitivities,
    score_emulation,
    sweep_groups,
)
from calibration.tiers import (
    GroupOptions,
    TierOption,
    TierPlan,
    group_tier_bytes,
    plan_tiers,
    shortest_prefix,
)

logger = logging.getLogger(__name__)

Prompts = Sequence[RenderedPrompt | str]
#: A group is checked exactly when its estimate is at least this fraction of the runbook floor (the
#: Fisher estimate is not exact; the margin keeps a group just under the floor from being missed).
FLOOR_MARGIN = 0.5
#: At most this many exact checks (the largest estimates first): the floor should be rare.
MAX_EXACT_GROUPS = 24
#: Padded tokens per scoring batch: each real token's logits are ``vocab`` floats (SmolLM2: 49 152).
SCORING_BATCH_TOKENS = 256
#: The Fisher pass reads each prompt's first tokens only: a prompt is never split across its
#: micro-batches, so its autograd memory grows with the longest prompt (SmolLM2, 4096 tokens: peak
#: +1.85 GB over the loaded model with 512-token prompts, +0.75 GB with 128, same wall time). Its
#: rank agreement with the exact sweep was measured on prompts cut at 96 tokens (fisher.py).
FISHER_PROMPT_TOKENS = 128
SCORES_FORMAT = "fp4roll.tier-scores"
SWEEP_FORMAT = "fp4roll.kl-sweep"


class RecalibrationResult(BaseModel):
    """Paths written and the headline numbers (for MLflow params/metrics)."""

    model_config = ConfigDict(frozen=True)

    checkpoint_dir: Path
    calibration_json: Path
    kl_chart: Path
    scheme: Tier
    rounding: Rounding
    corpus_digest: str
    num_groups: int
    tiers: dict[str, int]  # tier -> number of groups
    upgraded_groups: tuple[str, ...]  # groups above the base tier
    ignore: tuple[str, ...]
    target_kl: float | None
    target_met: bool | None
    extra_bytes_fraction: float
    all_quantized_mean_kl: float
    all_quantized_p99_kl: float
    all_quantized_top1: float
    plan_mean_kl: float
    plan_p99_kl: float
    plan_top1: float
    plan_delta_perplexity: float
    calibration_tokens: int
    evaluation_tokens: int
    bytes_by_tier: dict[str, int]
    checkpoint_bytes: int
    seconds: float


@dataclass(frozen=True)
class _Loaded:
    model: nn.Module
    tokenizer: Any
    source_dir: Path
    selection: TargetSelection


def _load(model_dir: str | Path, config: CalibrationConfig) -> _Loaded:
    """Model (in the compute dtype), tokenizer, source folder and target selection."""
    loaded = load_causal_lm(model_dir, dtype=config.compute_dtype, device=config.device)
    if loaded.tokenizer is None:
        raise ValueError(
            f"{model_dir} has no tokenizer files; calibration needs to tokenize prompts"
        )
    selection = select_targets(loaded.model, config.ignore)
    if not selection.groups:
        raise ValueError(
            f"{model_dir}: no Linear layer can be quantized with ignore={config.ignore}"
        )
    return _Loaded(loaded.model, loaded.tokenizer, loaded.source_dir, selection)


def _tokenize(
    loaded: _Loaded,
    prompts: Prompts,
    config: CalibrationConfig,
    *,
    budget: int | None,
    batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    max_length: int | None = None,
):
    return tokenize_prompts(
        loaded.tokenizer,
        prompts,
        max_length=min(config.max_prompt_tokens, max_length or config.max_prompt_tokens),
        batch_size=config.batch_size,
        token_budget=budget,
        max_batch_tokens=batch_tokens,
    )


def _needs_input_amax(config: CalibrationConfig) -> bool:
    """Only W4A4 groups carry a static input scale (FP8's activations are dynamic per token)."""
    return Tier.NVFP4 in _candidate_tiers(config)


def _calibrate(
    loaded: _Loaded, prompts: Prompts, config: CalibrationConfig, progress: bool
) -> tuple[ActivationStats, dict[str, RoundedGroup]]:
    """Input statistics and rounding over the calibration prompts (within the token budget), in as
    few passes as they allow: the sequential rounding pass observes every group's input amax on the
    way when it sees every group (plain decoder-block Linears); W4A16 plans need no amax at all; only
    round-to-nearest W4A4 and MoE models run a separate statistics forward."""
    tokenized = _tokenize(loaded, prompts, config, budget=config.token_budget)
    if tokenized.truncated:
        logger.warning(
            "%d of %d calibration prompts were longer than %d tokens and were truncated",
            tokenized.truncated,
            tokenized.num_prompts,
            config.max_prompt_tokens,
        )
    selection = loaded.selection
    counts = dict(
        num_prompts=tokenized.num_prompts,
        num_tokens=tokenized.num_tokens,
        truncated_prompts=tokenized.truncated,
        over_budget_prompts=tokenized.over_budget,
    )
    needs_amax = _needs_input_amax(config)
    rounding = dict(
        damp=config.gptq_damp,
        act_order=config.gptq_act_order,
        tiers=config.scheme,
        progress=progress,
    )
    if needs_amax and not observes_every_input(selection, config.rounding):
        stats = dataclasses.replace(
            collect_activation_stats(loaded.model, tokenized.batches, selection, progress=progress),
            **counts,
        )
        rounded = {}
        if config.rounding is not Rounding.RTN:
            rounded = round_model(
                loaded.model,
                tokenized.batches,
                selection,
                config.rounding,
                input_amax=stats.group_input_amax,
                **rounding,
            )
        return stats, rounded
    rounded = {}
    amax: dict[str, float] = {}
    if config.rounding is not Rounding.RTN:
        rounded, amax = round_and_observe(
            loaded.model,
            tokenized.batches,
            selection,
            config.rounding,
            observe_input_amax=needs_amax,
            **rounding,
        )
    member_to_group = {m: g.name for g in selection.groups for m in g.members}
    return ActivationStats(amax, member_to_group, **counts), rounded


def _candidate_tiers(config: CalibrationConfig) -> tuple[Tier, ...]:
    return (config.scheme, *(t for t in config.upgrade_tiers if t is not config.scheme))


def _scores(
    loaded: _Loaded,
    prompts: Prompts,
    config: CalibrationConfig,
    stats: ActivationStats,
    rounded: Mapping[str, RoundedGroup],
    progress: bool,
) -> dict[str, dict[Tier, float]]:
    """Estimated KL of every group alone at every candidate tier (one Fisher pass over the first
    ``fisher_tokens`` calibration tokens, each prompt cut at ``FISHER_PROMPT_TOKENS``). Groups the pass cannot score (routed experts) are left out:
    they get exact checks. With nothing to decide (no budget, target or floor) nothing is scored."""
    if config.max_extra_bytes == 0 and config.target_kl is None and config.kl_threshold is None:
        return {
            g.name: dict.fromkeys(_candidate_tiers(config), 0.0) for g in loaded.selection.groups
        }
    tokenized = _tokenize(
        loaded, prompts, config, budget=config.fisher_tokens, max_length=FISHER_PROMPT_TOKENS
    )
    return score_tiers(
        loaded.model,
        tokenized.batches,
        loaded.selection,
        _candidate_tiers(config),
        stats.group_input_amax,
        rounded=rounded,
        label_draws=config.fisher_label_draws,
        progress=progress,
    )


def _baseline(
    loaded: _Loaded,
    prompts: Prompts,
    config: CalibrationConfig,
    progress: bool,
    groups: Sequence[LinearGroup] = (),
) -> Baseline:
    tokenized = _tokenize(
        loaded, prompts, config, budget=config.sensitivity_tokens, batch_tokens=SCORING_BATCH_TOKENS
    )
    return compute_baseline(
        loaded.model,
        tokenized.batches,
        cache_blocks=blocks_to_cache(groups) if config.use_block_cache else (),
        logprob_dtype=config.logprob_dtype.torch_dtype,
        progress=progress,
    )


def _exact(
    loaded: _Loaded,
    baseline: Baseline,
    groups: Sequence[LinearGroup],
    stats: ActivationStats,
    rounded: Mapping[str, RoundedGroup],
    config: CalibrationConfig,
    progress: bool,
) -> tuple[GroupSensitivity, ...]:
    return sweep_groups(
        loaded.model,
        baseline,
        groups,
        stats,
        config.scheme,
        rounded=rounded,
        use_block_cache=config.use_block_cache,
        num_workers=config.num_workers,
        progress=progress,
    )


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; set overwrite=True to replace it")


def exact_candidate_names(
    scores: Mapping[str, Mapping[Tier, float]], unscored: Sequence[str], config: CalibrationConfig
) -> list[str]:
    """Groups whose decision depends on an exact KL: every group the Fisher pass could not score
    (``unscored``), and with a runbook floor the groups whose estimate at the base tier is at least
    ``FLOOR_MARGIN`` of it, the largest ``MAX_EXACT_GROUPS`` first."""
    if config.kl_threshold is None:
        return list(unscored)
    bar = FLOOR_MARGIN * config.kl_threshold
    near = [(est[config.scheme], name) for name, est in scores.items() if est[config.scheme] >= bar]
    if len(near) > MAX_EXACT_GROUPS:
        logger.warning(
            "%d groups are near the runbook floor; checking the %d largest exactly",
            len(near),
            MAX_EXACT_GROUPS,
        )
    return [*unscored, *(name for _, name in sorted(near, reverse=True)[:MAX_EXACT_GROUPS])]


def _complete_scores(
    selection: TargetSelection,
    scores: Mapping[str, Mapping[Tier, float]],
    exact: Mapping[str, float],
    config: CalibrationConfig,
) -> dict[str, dict[Tier, float]]:
    """Scores for every group: a group the Fisher pass left out (routed experts) takes its exact KL
    at the base tier, and at each higher tier that KL times the median higher/base ratio of the
    scored groups (the planner needs every tier's estimate; the plan's KL is measured anyway)."""
    complete = {name: dict(s) for name, s in scores.items()}
    ratios = {}
    for tier in _candidate_tiers(config)[1:]:
        values = [s[tier] / s[config.scheme] for s in scores.values() if s[config.scheme] > 0]
        ratios[tier] = float(np.median(values)) if values else 1.0
    for group in selection.groups:
        if group.name in complete:
            continue
        if group.name not in exact:
            raise ValueError(f"group {group.name} has neither a score nor an exact KL")
        base = exact[group.name]
        complete[group.name] = {config.scheme: base} | {
            t: (0.0 if t is Tier.BF16 else base * ratios[t]) for t in ratios
        }
    return complete


# ------------------------------------------------------------------------------------------ planning


def tier_options(
    selection: TargetSelection,
    scores: Mapping[str, Mapping[Tier, float]],
    exact: Mapping[str, float],
    config: CalibrationConfig,
) -> list[GroupOptions]:
    """One :class:`GroupOptions` per tier unit (a MoE layer's routed experts share one tier)."""
    itemsize = config.storage_dtype.torch_dtype.itemsize
    units: dict[str, list[LinearGroup]] = {}
    for group in selection.groups:
        units.setdefault(group.tier_unit, []).append(group)
    options = []
    for unit, groups in units.items():
        tier_options = tuple(
            TierOption(
                tier,
                sum(group_tier_bytes(g, tier, storage_itemsize=itemsize) for g in groups),
                0.0 if tier is Tier.BF16 else sum(scores[g.name][tier] for g in groups),
            )
            for tier in _candidate_tiers(config)
        )
        measured = [exact.get(g.name) for g in groups]
        exact_kl = sum(measured) if all(m is not None for m in measured) else None
        options.append(GroupOptions(unit, tier_options, exact_kl=exact_kl))
    return options


@dataclass(frozen=True)
class _Measured:
    """A measured plan (its checkpoint tensors are not kept: a bisection measures several)."""

    plan: TierPlan
    tiers: dict[str, Tier]  # group name -> tier
    score: QualityScore


class _Planner:
    """Plans over one baseline; every plan it returns was measured with a real forward of the whole
    emulated checkpoint (in the storage dtype, exactly what is exported)."""

    def __init__(
        self,
        loaded: _Loaded,
        baseline: Baseline,
        stats: ActivationStats,
        rounded: Mapping[str, RoundedGroup],
        options: Sequence[GroupOptions],
        config: CalibrationConfig,
    ) -> None:
        self.loaded, self.baseline, self.stats, self.rounded = loaded, baseline, stats, rounded
        self.options, self.config = options, config
        self._cache: dict[tuple, _Measured] = {}
        self.storage = config.storage_dtype.torch_dtype
        base = {g.name: config.scheme for g in loaded.selection.groups}
        self.all_base = self.quantize(base)
        self.base_checkpoint_bytes = sum(
            checkpoint_bytes_by_tier(loaded.model, self.all_base, self.storage).values()
        )
        base_group_bytes = sum(o.base.bytes for o in options)
        #: the budget as a fraction of the groups' base bytes (what plan_tiers counts in)
        self.group_budget = (
            None
            if config.max_extra_bytes is None
            else config.max_extra_bytes * self.base_checkpoint_bytes / base_group_bytes
        )

    def quantize(self, tiers: Mapping[str, Tier]) -> tuple[GroupQuantization, ...]:
        return quantize_groups(
            self.loaded.model,
            self.loaded.selection.groups,
            tiers,
            self.stats.group_input_amax,
            rounded=self.rounded,
        )

    def measure(self, prefix: int | None) -> _Measured:
        plan = plan_tiers(
            self.options,
            max_extra_bytes=self.group_budget,
            kl_threshold=self.config.kl_threshold,
            prefix=prefix,
        )
        tiers = {g.name: plan.tiers[g.tier_unit] for g in self.loaded.selection.groups}
        key = tuple(sorted(tiers.items()))
        if key not in self._cache:
            quantized = self.quantize(tiers)
            score = score_emulation(
                self.loaded.model, self.baseline, quantized, storage_dtype=self.storage
            )
            logger.info(
                "plan with %s upgrades (+%.1f%% bytes): measured mean KL %.5f",
                "all" if prefix is None else prefix,
                100 * plan.extra_bytes / self.base_checkpoint_bytes,
                score.mean_kl,
            )
            self._cache[key] = _Measured(plan, tiers, score)
        return self._cache[key]

    def probe(self, measured: _Measured, upgrades: int) -> PlanProbe:
        return PlanProbe(
            upgrades=upgrades,
            extra_bytes_fraction=measured.plan.extra_bytes / self.base_checkpoint_bytes,
            mean_kl=measured.score.mean_kl,
        )

    def choose(self) -> tuple[_Measured, bool | None, tuple[PlanProbe, ...]]:
        """Budget mode: the whole upgrade sequence that fits. Target mode: the shortest prefix whose
        measured KL reaches the target (bisection; the KL falls as upgrades are added), else the
        whole budget plan, reported as missing the target."""
        full = self.measure(None)
        floor = len(full.plan.floor)
        count = len(full.plan.upgrades) - floor
        probes = {count: self.probe(full, count)}
        target = self.config.target_kl
        if target is None:
            return full, None, tuple(probes.values())

        def reaches(k: int) -> bool:
            measured = self.measure(k)
            probes[k] = self.probe(measured, k)
            return measured.score.mean_kl <= target

        best = shortest_prefix(count, reaches, known_good=count)
        chosen = full if best is None else self.measure(best)
        ordered = tuple(probes[k] for k in sorted(probes))
        return chosen, best is not None, ordered


def _decisions(
    selection: TargetSelection,
    plan: TierPlan,
    tiers: Mapping[str, Tier],
    scores: Mapping[str, Mapping[Tier, float]],
    exact: Mapping[str, float],
    config: CalibrationConfig,
) -> list[GroupDecision]:
    itemsize = config.storage_dtype.torch_dtype.itemsize
    candidates = _candidate_tiers(config)
    return [
        GroupDecision(
            name=g.name,
            kind=g.kind.value,
            block_index=g.block_index,
            members=g.members,
            num_params=g.num_params,
            tier=tiers[g.name],
            reason=plan.reasons.get(g.tier_unit, "base tier"),
            estimates={t: (0.0 if t is Tier.BF16 else scores[g.name][t]) for t in candidates},
            bytes={t: group_tier_bytes(g, t, storage_itemsize=itemsize) for t in candidates},
            exact_kl=exact.get(g.name),
        )
        for g in selection.groups
    ]


def _rank_agreement(
    scores: Mapping[str, Mapping[Tier, float]],
    exact: Mapping[str, float],
    config: CalibrationConfig,
) -> float | None:
    """Spearman rank correlation of the Fisher estimate with the exact KL on the checked groups."""
    names = sorted(exact)
    if len(names) < 3:
        return None
    estimates = [scores[n][config.scheme] for n in names]
    rho = scipy.stats.spearmanr(estimates, [exact[n] for n in names])
    return float(rho.statistic)


def _plan_and_export(
    loaded: _Loaded,
    *,
    model_dir: str | Path,
    stats: ActivationStats,
    rounded: Mapping[str, RoundedGroup],
    scores: Mapping[str, Mapping[Tier, float]],
    exact_records: Sequence[GroupSensitivity],
    baseline: Baseline,
    corpus_digest: str,
    out_dir: Path,
    config: CalibrationConfig,
    overwrite: bool,
    started: float,
) -> RecalibrationResult:
    """Tier plan (measured) → atomic export of exactly the measured plan."""
    selection = loaded.selection
    exact = {r.group: r.mean_kl for r in exact_records}
    missing = [g.name for g in selection.groups if g.name not in scores and g.name not in exact]
    if missing:
        raise ValueError(
            f"the scores and exact checks do not cover {len(missing)} groups, e.g. {missing[:3]}"
        )
    agreement = _rank_agreement(scores, {g: kl for g, kl in exact.items() if g in scores}, config)
    scores = _complete_scores(selection, scores, exact, config)
    options = tier_options(selection, scores, exact, config)
    planner = _Planner(loaded, baseline, stats, rounded, options, config)
    all_base = score_emulation(
        loaded.model, baseline, planner.all_base, storage_dtype=planner.storage
    )
    planner.all_base = ()  # measured; its tensors are no longer needed
    chosen, target_met, probes = planner.choose()
    notes = []
    if target_met is False:
        notes.append(
            f"target KL {config.target_kl:g} not reached within the bytes budget: measured "
            f"{chosen.score.mean_kl:.4g} with every affordable upgrade"
        )
        logger.warning(notes[-1])
    summary = PlanSummary(
        target_kl=config.target_kl,
        max_extra_bytes=config.max_extra_bytes,
        kl_threshold=config.kl_threshold,
        extra_bytes=chosen.plan.extra_bytes,
        extra_bytes_fraction=chosen.plan.extra_bytes / planner.base_checkpoint_bytes,
        target_met=target_met,
        probes=probes,
        floor=chosen.plan.floor,
        exact_checked=tuple(sorted(exact)),
        rank_agreement=agreement,
        notes=tuple(notes),
    )
    decisions = _decisions(selection, chosen.plan, chosen.tiers, scores, exact, config)
    skipped = dict(selection.skipped)
    chart = render_kl_chart(
        decisions,
        kl_threshold=config.kl_threshold,
        title=(
            f"{Path(model_dir).name}: {config.scheme.value} + {config.rounding.value}, "
            f"plan KL {chosen.score.mean_kl:.4f} (all {config.scheme.value}: "
            f"{all_base.mean_kl:.4f}) at +{100 * summary.extra_bytes_fraction:.1f}% bytes"
        ),
    )
    storage = planner.storage
    chosen_quantized = planner.quantize(chosen.tiers)  # what was measured, bit for bit
    bytes_by_tier = checkpoint_bytes_by_tier(loaded.model, chosen_quantized, storage)
    record = build_calibration_record(
        corpus_digest=corpus_digest,
        scheme=config.scheme,
        rounding=config.rounding,
        calibration_sample={
            "prompts": stats.num_prompts,
            "tokens": stats.num_tokens,
            "truncated_prompts": stats.truncated_prompts,
            "over_budget_prompts": stats.over_budget_prompts,
        },
        evaluation_sample={"prompts": baseline.num_prompts, "tokens": baseline.num_tokens},
        decisions=decisions,
        summary=summary,
        all_quantized=all_base,
        with_plan=chosen.score,
        ignore=tuple(skipped),
        bytes_by_tier=bytes_by_tier,
        settings=config_record(config) | {"source_model": str(loaded.source_dir)},
    )
    written = export_checkpoint(
        loaded.model,
        out_dir,
        chosen_quantized,
        skipped=skipped,
        source_dir=loaded.source_dir,
        tokenizer=loaded.tokenizer,
        extra_files={CALIBRATION_JSON: record, KL_CHART_PNG: chart},
        overwrite=overwrite,
        dtype=storage,
    )
    return _result(
        out_dir,
        record,
        config,
        checkpoint_bytes=written.bytes_after,
        seconds=time.perf_counter() - started,
    )


def _result(
    out_dir: Path,
    record: Mapping[str, Any],
    config: CalibrationConfig,
    *,
    checkpoint_bytes: int,
    seconds: float,
) -> RecalibrationResult:
    """The result of a finished export, from its ``calibration.json`` record."""
    combined_all = record["combined"]["all_quantized_except_lm_head"]
    combined = record["combined"]["plan"]
    plan = record["plan"]

    def num(value: float | None) -> float:  # null in JSON for non-finite values
        return float("nan") if value is None else float(value)

    return RecalibrationResult(
        checkpoint_dir=out_dir,
        calibration_json=out_dir / CALIBRATION_JSON,
        kl_chart=out_dir / KL_CHART_PNG,
        scheme=Tier(record["format"]["scheme"]),
        rounding=Rounding(record["format"]["rounding"]),
        corpus_digest=record["corpus_digest"],
        num_groups=len(record["groups"]),
        tiers=dict(plan["groups_by_tier"]),
        upgraded_groups=tuple(
            g["name"] for g in record["groups"] if g["tier"] != record["format"]["scheme"]
        ),
        ignore=tuple(record["ignore"]),
        target_kl=plan["target_kl"],
        target_met=plan["target_met"],
        extra_bytes_fraction=plan["extra_bytes_fraction"],
        all_quantized_mean_kl=num(combined_all["mean_kl"]),
        all_quantized_p99_kl=num(combined_all["p99_kl"]),
        all_quantized_top1=num(combined_all["top1_agreement"]),
        plan_mean_kl=num(combined["mean_kl"]),
        plan_p99_kl=num(combined["p99_kl"]),
        plan_top1=num(combined["top1_agreement"]),
        plan_delta_perplexity=num(combined["delta_perplexity"]),
        calibration_tokens=record["calibration_sample"]["tokens"],
        evaluation_tokens=record["evaluation_sample"]["tokens"],
        bytes_by_tier=dict(record["bytes_by_tier"]),
        checkpoint_bytes=checkpoint_bytes,
        seconds=seconds,
    )


def config_record(config: CalibrationConfig) -> dict[str, Any]:
    """The config as JSON-able values (enums by value), for calibration.json and MLflow params."""
    return json.loads(json.dumps(dataclasses.asdict(config), default=lambda v: v.value))


def recalibrate(
    model_dir: str | Path,
    calibration_prompts: Prompts,
    sensitivity_prompts: Prompts,
    corpus_digest: str,
    out_dir: str | Path,
    config: CalibrationConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> RecalibrationResult:
    """Calibrate the safetensors model at ``model_dir`` and write its quantized checkpoint to ``out_dir``.

    ``calibration_prompts`` set the activation statistics, the rounding and the Fisher scores (all
    of them, within the token budget); ``sensitivity_prompts`` (disjoint) measure the exact checks and
    every plan. Both are rendered, already redacted prompts; ``corpus_digest`` identifies the
    calibration set. The checkpoint folder is written atomically; ``out_dir`` must not exist unless
    ``overwrite``.
    """
    config = config or CalibrationConfig()
    started = time.perf_counter()
    if not corpus_digest:
        raise ValueError(
            "corpus_digest is required (it ties the checkpoint to its calibration set)"
        )
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    loaded = _load(model_dir, config)
    stats, rounded = _calibrate(loaded, calibration_prompts, config, progress)
    scores = _scores(loaded, calibration_prompts, config, stats, rounded, progress)
    unscored = [g.name for g in loaded.selection.groups if g.name not in scores]
    candidates = selection_groups(loaded.selection, exact_candidate_names(scores, unscored, config))
    baseline = _baseline(loaded, sensitivity_prompts, config, progress, candidates)
    exact = _exact(loaded, baseline, candidates, stats, rounded, config, progress)
    baseline = baseline.without_block_cache()  # the plan's measurements run whole forwards
    release_free_memory()
    return _plan_and_export(
        loaded,
        model_dir=model_dir,
        stats=stats,
        rounded=rounded,
        scores=scores,
        exact_records=exact,
        baseline=baseline,
        corpus_digest=corpus_digest,
        out_dir=out_dir,
        config=config,
        overwrite=overwrite,
        started=started,
    )


# ------------------------------------------------------------------------------------------ stages


def calibrate_files(
    model_dir: str | Path,
    calibration_prompts: Prompts,
    stats_path: str | Path,
    rounded_path: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Stage 1: input statistics → JSON and the rounded NVFP4 weights and scales of every group →
    safetensors (empty for rtn), from as few passes as :func:`_calibrate` needs. Both files are
    written atomically, the statistics last: they mark the stage finished."""
    config = config or CalibrationConfig()
    stats_path, rounded_path = Path(stats_path), Path(rounded_path)
    if stats_path.exists() and rounded_path.exists():
        return stats_path, rounded_path
    stats, rounded = _calibrate(_load(model_dir, config), calibration_prompts, config, progress)
    save_rounded(rounded_path, rounded)
    return atomic.write_text(stats_path, stats.to_json()), rounded_path


def score_file(
    model_dir: str | Path,
    calibration_prompts: Prompts,
    stats_path: str | Path,
    rounded_path: str | Path,
    out_path: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Stage 2: estimated KL of every group at every candidate tier (one Fisher pass) → JSON."""
    config = config or CalibrationConfig()
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    loaded = _load(model_dir, config)
    stats = ActivationStats.from_json(Path(stats_path).read_text())
    scores = _scores(
        loaded, calibration_prompts, config, stats, load_rounded(rounded_path), progress
    )
    payload = {
        "format": SCORES_FORMAT,
        "version": 1,
        "scores": {g: {t.value: v for t, v in s.items()} for g, s in scores.items()},
        "unscored": [g.name for g in loaded.selection.groups if g.name not in scores],
    }
    return atomic.write_json(out_path, payload)


def load_score_file(path: str | Path) -> tuple[dict[str, dict[Tier, float]], list[str]]:
    """(group -> tier -> estimate, the groups the Fisher pass left out)."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != SCORES_FORMAT:
        raise ValueError(f"{path} is not a tier-scores file (format {data.get('format')!r})")
    scores = {g: {Tier(t): float(v) for t, v in s.items()} for g, s in data["scores"].items()}
    return scores, list(data.get("unscored", []))


def exact_candidates(scores_path: str | Path, config: CalibrationConfig) -> list[str]:
    """Stage 3: the groups that need an exact KL (see :func:`exact_candidate_names`)."""
    return exact_candidate_names(*load_score_file(scores_path), config)


def sweep_file(
    model_dir: str | Path,
    sensitivity_prompts: Prompts,
    stats_path: str | Path,
    rounded_path: str | Path,
    group_names: Sequence[str],
    out_path: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> Path:
    """Stage 4 (fans out): exact KL of each of ``group_names`` quantized alone → JSON records.

    Results do not depend on how the groups are split (each group is scored alone against the same
    baseline), so any partition merged by :func:`plan_and_export` gives the same plan.
    """
    config = config or CalibrationConfig()
    out_path = Path(out_path)
    if out_path.exists():
        return out_path
    loaded = _load(model_dir, config)
    groups = selection_groups(loaded.selection, group_names)
    records: tuple[GroupSensitivity, ...] = ()
    if groups:
        stats = ActivationStats.from_json(Path(stats_path).read_text())
        baseline = _baseline(loaded, sensitivity_prompts, config, progress, groups)
        records = _exact(
            loaded, baseline, groups, stats, load_rounded(rounded_path), config, progress
        )
    payload = {
        "format": SWEEP_FORMAT,
        "version": 1,
        "records": [dataclasses.asdict(r) for r in records],
    }
    return atomic.write_json(out_path, payload)


def load_sweep_file(path: str | Path) -> tuple[GroupSensitivity, ...]:
    data = json.loads(Path(path).read_text())
    if data.get("format") != SWEEP_FORMAT:
        raise ValueError(f"{path} is not a KL-sweep file (format {data.get('format')!r})")
    return tuple(GroupSensitivity(**{**r, "members": tuple(r["members"])}) for r in data["records"])


def plan_and_export(
    model_dir: str | Path,
    sensitivity_prompts: Prompts,
    stats_path: str | Path,
    rounded_path: str | Path,
    scores_path: str | Path,
    sweep_paths: Sequence[str | Path],
    corpus_digest: str,
    out_dir: str | Path,
    config: CalibrationConfig | None = None,
    *,
    progress: bool = True,
) -> RecalibrationResult:
    """Stage 5: plan (measured), export the checkpoint. A finished ``out_dir`` (its
    ``calibration.json`` exists) is reused as is."""
    config = config or CalibrationConfig()
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if (out_dir / CALIBRATION_JSON).exists():
        logger.info("%s already holds a finished checkpoint; reusing it", out_dir)
        return result_from_checkpoint(out_dir, config)
    loaded = _load(model_dir, config)
    exact = merge_sensitivities((load_sweep_file(p) for p in sweep_paths), loaded.selection)
    return _plan_and_export(
        loaded,
        model_dir=model_dir,
        stats=ActivationStats.from_json(Path(stats_path).read_text()),
        rounded=load_rounded(rounded_path),
        scores=load_score_file(scores_path)[0],
        exact_records=exact,
        baseline=_baseline(loaded, sensitivity_prompts, config, progress),
        corpus_digest=corpus_digest,
        out_dir=out_dir,
        config=config,
        overwrite=True,
        started=started,
    )


def result_from_checkpoint(out_dir: Path, config: CalibrationConfig) -> RecalibrationResult:
    """Rebuild the result of a finished export from its ``calibration.json``."""
    record = json.loads((out_dir / CALIBRATION_JSON).read_text())
    return _result(
        out_dir,
        record,
        config,
        checkpoint_bytes=sum(p.stat().st_size for p in out_dir.glob("*.safetensors")),
        seconds=0.0,
    )
