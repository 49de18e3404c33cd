"""System of record: prompt logs, calibration sets, rollouts, MLflow, canary gates (no torch, no prefect)."""
