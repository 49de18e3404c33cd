"""MLflow tag keys fp4roll writes and reads (runs, model versions, experiments): one place to look
them up, so a reader and a writer can never disagree about a key's spelling."""

from __future__ import annotations

PREFIX = "fp4roll."

# --- runs and model versions
IDEMPOTENCY_KEY = "fp4roll.idempotency_key"  # hash of the inputs + checkpoint bytes
MODEL_NAME = "fp4roll.model_name"
KIND = "fp4roll.kind"  # run kind: "baseline" for the registered source model
CORPUS_DIGEST = "fp4roll.corpus_digest"  # calibration set digest (also on the lineage dataset)
FALLBACK_LAYERS = "fp4roll.fallback_layers"  # JSON list of the layers kept high precision
SCHEME = "fp4roll.scheme"
BLOCK_SIZE = "fp4roll.block_size"
CODE_VERSION = "fp4roll.code_version"
SOURCE_MODEL = "fp4roll.source_model"
CHECKPOINT_SHA256 = (
    "fp4roll.checkpoint_sha256"  # digest of the checkpoint manifest (registry.integrity)
)

# --- model versions: what the rollout did to them (registry.aliases.VersionOutcome)
OUTCOME = "fp4roll.outcome"
PROMOTED_AT = "fp4roll.promoted_at"
PROMOTE_REASON = "fp4roll.promote_reason"
SUPERSEDED_BY = "fp4roll.superseded_by"
PREVIOUS_CHAMPION_BEFORE = "fp4roll.previous_champion_before"
RESTORED_FROM = "fp4roll.restored_from"
RESTORE_PREVIOUS_CHAMPION = "fp4roll.restore_previous_champion"
RESTORED_AT = "fp4roll.restored_at"
ROLLBACK_REASON = "fp4roll.rollback_reason"
ROLLED_BACK_AT = "fp4roll.rolled_back_at"
REJECT_REASON = "fp4roll.reject_reason"

# --- experiments (MLflow's own key): lists fp4roll's experiments among model-training experiments
# in the MLflow 3 UI (the other kinds are GenAI ones)
EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND_MODEL_DEVELOPMENT = "custom_model_development"
