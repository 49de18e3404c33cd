import dataclasses

import pytest
from pydantic import ValidationError

from calibration.config import CalibrationConfig, SamplingConfig
from calibration.precision import Rounding, Tier
from pipelines.params import (
    CanaryParams,
    DriftCheckParams,
    RecalibrateParams,
    RollbackParams,
)


def test_defaults_are_valid_and_frozen():
    params = RecalibrateParams()
    assert params.calibration.scheme is Tier.NVFP4 and params.calibration.kl_threshold == 0.05
    assert params.calibration == CalibrationConfig() and params.sampling == SamplingConfig()
    with pytest.raises(ValidationError):
        params.model_name = "other"  # frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.calibration.kl_threshold = 1.0
    assert CanaryParams().stages == [1.0, 10.0, 50.0, 100.0]
    assert DriftCheckParams().recalibrate.model_name == params.model_name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stages": [10, 1, 100]}, "strictly ascending"),
        ({"stages": [1, 10, 50]}, "last stage must be 100"),
        ({"stages": [0, 100]}, "traffic percentage"),
        ({"min_samples": 1}, "greater than or equal to 2"),
        ({"model_name": "bad name!"}, "should match pattern"),
        ({"stagez": [1, 100]}, "Extra inputs are not permitted"),
    ],
)
def test_canary_params_reject_bad_input(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        CanaryParams(**kwargs)


def test_recalibrate_params_validate_the_nested_configs():
    with pytest.raises(ValidationError, match="not before"):
        RecalibrateParams(
            sampling={"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
        )
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RecalibrateParams(sampling={"calibration_size": 0})
    with pytest.raises(ValidationError, match="needs a target"):
        RecalibrateParams(calibration={"max_extra_bytes": None})
    with pytest.raises(ValidationError, match="scheme must be one of"):
        RecalibrateParams(calibration={"scheme": "bf16"})
    with pytest.raises(ValidationError, match="Unexpected keyword argument"):
        RecalibrateParams(calibration={"max_seq_len": 64})
    with pytest.raises(ValidationError, match="reason"):
        RollbackParams()
    budget_only = RecalibrateParams(
        calibration={"kl_threshold": None, "max_extra_bytes": 0.2},
        sampling={"since": "2026-01-01T00:00:00"},
    )
    assert budget_only.calibration.kl_threshold is None
    assert budget_only.sampling.since.tzinfo is not None  # naive times are UTC
    # JSON round trip (Prefect persists parameters and renders the schema as a form)
    again = RecalibrateParams.model_validate_json(budget_only.model_dump_json())
    assert again == budget_only
    schema = RecalibrateParams.model_json_schema()
    calibration = schema["$defs"]["CalibrationConfig"]["properties"]
    assert "Runbook floor" in calibration["kl_threshold"]["description"]


def test_cli_options_are_built_from_the_models(tmp_path, monkeypatch):
    """Every leaf field is an option with the model's default in its help; 'none' unsets."""
    from typer.testing import CliRunner

    from pipelines import cli_flows
    from pipelines.cli import app

    seen = []
    monkeypatch.setattr(cli_flows, "_run_recalibrate", seen.append)
    # the command object captured the function at import: rebuild it around the stub
    command = cli_flows.options_command(
        RecalibrateParams, seen.append, flags={"model_name": ("-m",)}
    )
    import typer

    probe = typer.Typer()
    probe.command("recalibrate")(command)
    runner = CliRunner()
    help_text = runner.invoke(probe, ["--help"], env={"COLUMNS": "200"}).output
    for field in ("--calibration-size", "--max-prompt-tokens", "--kl-threshold", "--scheme"):
        assert field in help_text
    assert "(default: 128)" in help_text and "(default: 0.05)" in help_text
    result = runner.invoke(
        probe,
        ["--kl-threshold", "none", "--max-extra-bytes", "0.2", "--target-kl", "0.1",
         "--upgrade-tiers", "fp8", "--rounding", "mse", "--calibration-size", "64",
         "--routes", "a", "--routes", "b", "--no-use-block-cache"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (params,) = seen
    config = params.calibration
    assert config.kl_threshold is None and config.max_extra_bytes == 0.2 and config.target_kl == 0.1
    assert config.upgrade_tiers == (Tier.FP8,) and config.rounding is Rounding.MSE
    assert params.sampling.calibration_size == 64 and params.sampling.routes == ("a", "b")
    assert params.calibration.use_block_cache is False
    assert params.sampling.holdout_size == SamplingConfig().holdout_size  # untouched: the default
    bad = runner.invoke(probe, ["--max-extra-bytes", "none"])
    assert bad.exit_code == 2 and "needs a target" in bad.output
    assert "recalibrate" in runner.invoke(app, ["--help"]).output
