"""The calibration run's settings: one frozen dataclass, every default written once.

Fields carry their bounds as ``annotated_types`` metadata and their help text as ``description``, so
the flow parameter model (pydantic, in ``pipelines/params.py``) validates and documents them from here,
and the ``fp4roll`` CLI builds its options from the same fields. Torch-free on purpose (the CLI and the
flow parameters import it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

import annotated_types as at

from calibration.precision import DEFAULT_IGNORE, NVFP4_SCHEMES, ModelDtype, Rounding, Tier

#: Per-prompt token limit: covers every prompt of the shipped logs rendered with SmolLM2's chat
#: template (max 2 562, p99 1 481 tokens); a longer prompt is truncated and counted in the report.
DEFAULT_MAX_PROMPT_TOKENS = 4096


def described(default: Any, description: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and the help text that forms and ``--help`` show."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return field(default=default, metadata={"description": description}, **kwargs)


def check_fields(instance: Any) -> None:
    """Coerce and check a frozen config's fields from their annotations; call from ``__post_init__``.

    Enum fields accept their values (``"nvfp4"`` -> ``Tier.NVFP4``), tuple fields accept lists; a value
    breaking its ``annotated_types`` bound (``Ge``, ``Gt``, ``Le``, ``Lt``, ``Interval``) raises
    ``ValueError`` naming the field. ``None`` passes.
    """
    hints = typing.get_type_hints(type(instance), include_extras=True)
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        if value is None:
            continue
        inner = _inner_type(hints.get(f.name))
        if isinstance(inner, type) and issubclass(inner, Enum) and not isinstance(value, inner):
            try:
                value = inner(value)
            except ValueError:
                allowed = ", ".join(str(m.value) for m in inner)
                raise ValueError(f"{f.name} must be one of {allowed}, got {value!r}") from None
            object.__setattr__(instance, f.name, value)
        elif typing.get_origin(inner) is tuple and isinstance(value, (list, tuple)):
            value = tuple(_coerce_items(f.name, value, typing.get_args(inner)))
            object.__setattr__(instance, f.name, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        for bound in _bounds(hints.get(f.name)):
            for op, limit, sign in (
                ("ge", getattr(bound, "ge", None), ">="),
                ("gt", getattr(bound, "gt", None), ">"),
                ("le", getattr(bound, "le", None), "<="),
                ("lt", getattr(bound, "lt", None), "<"),
            ):
                if limit is None:
                    continue
                ok = {
                    "ge": value >= limit,
                    "gt": value > limit,
                    "le": value <= limit,
                    "lt": value < limit,
                }[op]
                if not ok or (isinstance(value, float) and math.isnan(value)):
                    raise ValueError(f"{f.name} must be {sign} {limit}, got {value}")


def _coerce_items(name: str, items: tuple | list, args: tuple) -> list:
    """Items of a ``tuple[Enum, ...]`` field coerced from their values; other tuples unchanged."""
    kind = args[0] if args else None
    if not (isinstance(kind, type) and issubclass(kind, Enum)):
        return list(items)
    try:
        return [item if isinstance(item, kind) else kind(item) for item in items]
    except ValueError:
        allowed = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"{name} items must be among {allowed}, got {list(items)!r}") from None


def _inner_type(hint: Any) -> Any:
    """The type under Annotated / Optional."""
    if typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return _inner_type(args[0])
    return hint


def _bounds(hint: Any) -> list[Any]:
    found: list[Any] = []
    if typing.get_origin(hint) is Annotated:
        found.extend(m for m in typing.get_args(hint)[1:] if isinstance(m, at.BaseMetadata))
        hint = typing.get_args(hint)[0]
    for arg in typing.get_args(hint):  # Optional[Annotated[...]]
        found.extend(_bounds(arg))
    return found


PositiveInt = Annotated[int, at.Ge(1)]

# Upper edges (exclusive) of the length strata, in approximate tokens; the last stratum is open.
DEFAULT_LENGTH_EDGES: tuple[int, ...] = (32, 128, 512)
DEFAULT_NEAR_DUPLICATE_THRESHOLD = 0.8
Fraction = Annotated[float, at.Interval(ge=0.0, le=1.0)]


@dataclass(frozen=True)
class CalibrationConfig:
    """How one calibration run quantizes, scores and plans (DESIGN.md "Quality")."""

    scheme: Tier = described(
        Tier.NVFP4, "NVFP4 tier the groups start from: nvfp4 = W4A4, nvfp4a16 = weights only."
    )
    max_prompt_tokens: Annotated[int, at.Ge(8)] = described(
        DEFAULT_MAX_PROMPT_TOKENS,
        "Tokens per prompt; a longer prompt is truncated (and counted in calibration.json).",
    )
    token_budget: Annotated[int, at.Ge(8)] | None = described(
        None,
        "At most this many calibration tokens feed the activation statistics (None: every prompt).",
    )
    rounding: Rounding = described(
        Rounding.GPTQ_MSE,
        "NVFP4 rounding: rtn, mse (searched block scales), gptq, gptq-mse (GPTQ under searched scales).",
    )
    gptq_damp: Annotated[float, at.Gt(0.0), at.Lt(1.0)] = described(
        0.01, "GPTQ dampening, a fraction of the Hessian's mean diagonal."
    )
    gptq_act_order: bool = described(
        True, "GPTQ quantizes columns in order of decreasing input second moment."
    )
    fisher_tokens: Annotated[int, at.Ge(8)] | None = described(
        4096,
        "Calibration tokens the one-pass Fisher sensitivity reads (prompts in order while they fit; "
        "'none': all).",
    )
    fisher_label_draws: PositiveInt = described(
        2, "Labels drawn from the model per token in the Fisher pass (more: less noise, slower)."
    )
    target_kl: Annotated[float, at.Gt(0.0)] | None = described(
        None,
        "Plan by target: the fewest extra bytes whose measured combined KL (nats) is at most this "
        "('none': least KL within --max-extra-bytes).",
    )
    max_extra_bytes: Annotated[float, at.Ge(0.0)] | None = described(
        0.10,
        "Bytes budget of the plan: extra bytes over the all-NVFP4 checkpoint, as a fraction "
        "(0.1 = +10 %; 'none': unlimited).",
    )
    upgrade_tiers: tuple[Tier, ...] = described(
        (Tier.FP8, Tier.BF16), "Higher tiers a group may be moved to (fp8 = W8A8, bf16)."
    )
    kl_threshold: Annotated[float, at.Ge(0.0)] | None = described(
        0.05,
        "Runbook floor: a group whose exact KL quantized alone exceeds this never stays NVFP4 "
        "(nats; 'none': no floor).",
    )
    storage_dtype: ModelDtype = described(
        ModelDtype.BF16, "Dtype of the unquantized tensors in the checkpoint (and config.json)."
    )
    compute_dtype: ModelDtype = described(
        ModelDtype.FP32, "Dtype the model computes in during calibration and scoring."
    )
    batch_size: PositiveInt = described(8, "Prompts per forward pass.")
    device: str = described("cpu", "Torch device: cpu, cuda, cuda:N or auto.")
    num_workers: PositiveInt = described(1, "Thread-pool workers of the exact per-group KL checks.")
    sensitivity_tokens: Annotated[int, at.Ge(8)] | None = described(
        4096,
        "Sensitivity tokens the exact checks and every measured plan read (prompts in order while "
        "they fit; 'none': all). The baseline keeps a log-prob per token and vocabulary entry.",
    )
    logprob_dtype: ModelDtype = described(
        ModelDtype.FP16, "Dtype the baseline's log-probs are kept in (fp32 exact; 16-bit halves)."
    )
    use_block_cache: bool = described(
        True, "Resume each sweep forward at the group's decoder block from cached inputs."
    )
    ignore: tuple[str, ...] = described(
        DEFAULT_IGNORE,
        "Layers never quantized (compressed-tensors patterns: a name or suffix, or 're:<regex>').",
    )

    def __post_init__(self) -> None:
        check_fields(self)
        if self.scheme not in NVFP4_SCHEMES:
            raise ValueError(
                f"scheme must be one of {[t.value for t in NVFP4_SCHEMES]}, got {self.scheme}"
            )
        bad = [t.value for t in self.upgrade_tiers if t in NVFP4_SCHEMES]
        if bad:
            raise ValueError(f"upgrade_tiers are higher tiers (fp8, bf16), got {bad}")
        if self.target_kl is None and self.max_extra_bytes is None:
            raise ValueError("an unlimited budget needs a target: set target_kl or max_extra_bytes")


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class SamplingConfig:
    """What to sample from the prompt logs (naive times are UTC)."""

    calibration_size: Annotated[int, at.Ge(1)] = described(
        128, "Prompts whose activations set the static input scales (all of them are used)."
    )
    sensitivity_size: Annotated[int, at.Ge(0)] = described(
        32, "Prompts, disjoint from the rest, that score each group's sensitivity and the plan."
    )
    holdout_size: Annotated[int, at.Ge(0)] = described(
        128, "Prompts held out for the canary, disjoint from calibration."
    )
    since: dt.datetime | None = described(None, "Log window start (inclusive). Default: all logs.")
    until: dt.datetime | None = described(None, "Log window end (exclusive). Default: now.")
    routes: tuple[str, ...] | None = described(None, "Only these routes. Default: every route.")
    seed: Annotated[int, at.Ge(0)] = described(0, "Seed of the ranking inside each stratum.")
    length_edges: tuple[int, ...] = described(
        DEFAULT_LENGTH_EDGES, "Upper edges of the length strata (approximate tokens)."
    )
    near_duplicate_threshold: Annotated[float, at.Gt(0.0), at.Le(1.0)] = described(
        DEFAULT_NEAR_DUPLICATE_THRESHOLD, "Jaccard similarity from which prompts are duplicates."
    )

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "since", _utc(self.since))
        object.__setattr__(self, "until", _utc(self.until))
        if self.since and self.until and self.since >= self.until:
            raise ValueError(f"empty window: since {self.since} is not before until {self.until}")
        if list(self.length_edges) != sorted(set(self.length_edges)) or any(
            e <= 0 for e in self.length_edges
        ):
            raise ValueError(
                f"length_edges must be strictly increasing positives: {self.length_edges}"
            )

    @property
    def total(self) -> int:
        return self.calibration_size + self.sensitivity_size + self.holdout_size

    def in_window(self, record: Any) -> bool:
        """Whether a prompt record (``received_at``, ``route``) falls in the window."""
        return (
            (self.since is None or record.received_at >= self.since)
            and (self.until is None or record.received_at < self.until)
            and (self.routes is None or record.route in self.routes)
        )
