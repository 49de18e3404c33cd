import dataclasses
import json

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


# ------------------------------------------------------------------------------ live canary params

LIVE = {
    "baseline_url": "http://127.0.0.1:8001",
    "candidate_url": "http://127.0.0.1:8002/v1",
    "baseline_model": "smollm2",
    "candidate_model": "smollm2-nvfp4",
}


def test_live_canary_params_select_the_endpoint_policy():
    from pipelines.canary.endpoints import ClientSettings, ServerFlavor
    from pipelines.params import LiveCanaryParams, RouterKind

    replay = CanaryParams().policy()
    live = CanaryParams(live=LIVE)
    assert isinstance(live.live, LiveCanaryParams)
    assert live.live.flavor is ServerFlavor.VLLM and live.live.router is RouterKind.NONE
    assert live.live.client_settings() == ClientSettings()  # the evaluator's defaults, written once
    gates = {g.name: g for g in live.policy().metrics}
    assert gates["latency_ms"].enforced and gates["ttft_ms"].enforced  # real latency is judged
    assert "outlier_fallback_rate" not in gates and gates["top1_agreement"].ceiling == 0.85
    assert not {g.name: g for g in replay.metrics}["latency_ms"].enforced  # emulated: reported
    assert "ttft_ms" not in {g.name for g in replay.metrics}
    # Prefect persists parameters as JSON and renders the schema as a form
    again = CanaryParams.model_validate_json(live.model_dump_json())
    assert again == live
    schema = CanaryParams.model_json_schema()["$defs"]["LiveCanaryParams"]["properties"]
    assert "never a parameter" in schema["baseline_api_key_env"]["description"]


def test_live_gate_overrides_name_endpoint_metrics_only_when_live():
    widened = {"metric_overrides": {"ttft_ms": {"max_effect": 3.0, "critical_effect": 5.0}}}
    live = CanaryParams(live=LIVE, gate_policy=widened)
    assert {g.name: g for g in live.policy().metrics}["ttft_ms"].max_effect == 3.0
    with pytest.raises(ValidationError, match="endpoint evaluator only"):
        CanaryParams(gate_policy=widened)  # the in-process replay measures no TTFT
    with pytest.raises(ValidationError, match="unknown metrics"):
        CanaryParams(
            live=LIVE,
            gate_policy={"metric_overrides": {"outlier_fallback_rate": {"ceiling": 0.1}}},
        )


@pytest.mark.parametrize(
    "change, message",
    [
        ({"baseline_url": "ftp://host:21"}, "http\\(s\\) URL"),
        ({"candidate_url": "http://user:s3cret@host:8000"}, "carries credentials"),
        ({"candidate_url": "http://host:8000/v1?api_key=s3cret"}, "carries credentials"),
        ({"baseline_api_key_env": "sk-s3cret"}, "should match pattern"),
        ({"router": "nginx"}, "needs nginx_dir"),
        ({"nginx_dir": "/tmp/gw"}, "router is none"),
        ({"router": "envoy"}, "Input should be 'none' or 'nginx'"),
        ({"flavor": "tgi"}, "Input should be 'vllm' or 'llamacpp'"),
        ({"kl_top_k": 30, "top_k": 20}, "kl_top_k must lie in"),
        ({"concurrency": 0}, "greater than or equal to 1"),
        ({"route_min_samples": 1}, "greater than or equal to 2"),
        ({"api_key": "s3cret"}, "Extra inputs are not permitted"),
        ({"candidate_model": ""}, "at least 1 character"),
    ],
)
def test_live_canary_params_reject_bad_input(change, message):
    with pytest.raises(ValidationError, match=message) as caught:
        CanaryParams(live={**LIVE, **change})
    assert "s3cret" not in str(caught.value)  # parameters are never echoed


def test_live_canary_params_need_both_endpoints():
    with pytest.raises(ValidationError, match="candidate_url"):
        CanaryParams(live={k: v for k, v in LIVE.items() if k != "candidate_url"})


def test_canary_cli_builds_the_live_params(tmp_path, monkeypatch):
    """`fp4roll canary` takes the live fields as options (flattened from LiveCanaryParams); any
    of them selects the live canary; without them the canary replays in process."""
    import sys
    import types

    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.results import CanaryOutcome, CanaryRecord

    seen = []

    def canary_flow(params):
        seen.append(params)
        return CanaryRecord(
            model_name=params.model_name,
            rollout_id=1,
            candidate_version="2",
            baseline_version="1",
            outcome=CanaryOutcome.ROLLED_BACK,
            stages=(),
        )

    stub = types.ModuleType("pipelines.flows")
    stub.canary_flow = canary_flow
    monkeypatch.setitem(sys.modules, "pipelines.flows", stub)
    # the stubbed flow journaled nothing: the gateway column reads an empty journal
    import pipelines.rollout

    monkeypatch.setattr(pipelines.rollout, "gateway_weights", lambda rollout_id, db_url=None: {})
    runner = CliRunner()
    help_text = runner.invoke(app, ["canary", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--candidate-url", "--baseline-api-key-env", "--router", "--nginx-dir",
                   "--route-min-samples", "--max-tokens", "--flavor"):  # fmt: skip
        assert option in help_text, option
    assert "--fail-after-stage" not in help_text and "--metric-overrides" not in help_text
    policy = tmp_path / "gates.json"
    policy.write_text(
        json.dumps({"metric_overrides": {"ttft_ms": {"max_effect": 3.0, "critical_effect": 5.0}}})
    )
    result = runner.invoke(
        app,
        ["canary", "-m", "demo-model", "--stages", "10,50,100", "--min-samples", "6",
         "--baseline-url", LIVE["baseline_url"], "--candidate-url", LIVE["candidate_url"],
         "--baseline-model", "smollm2", "--candidate-model", "smollm2", "--flavor", "llamacpp",
         "--candidate-api-key-env", "CANDIDATE_KEY", "--router", "nginx", "--nginx-dir",
         str(tmp_path), "--max-tokens", "8", "--concurrency", "2", "--route-min-samples", "5",
         "--policy", str(policy)],
    )  # fmt: skip
    assert result.exit_code == 3, result.output  # the stub rolled back
    (params,) = seen
    assert params.model_name == "demo-model" and params.stages == [10.0, 50.0, 100.0]
    live = params.live
    assert live.flavor.value == "llamacpp" and live.router.value == "nginx"
    assert live.nginx_dir == str(tmp_path) and live.candidate_api_key_env == "CANDIDATE_KEY"
    assert live.max_tokens == 8 and live.concurrency == 2 and live.route_min_samples == 5
    assert {g.name: g for g in params.policy().metrics}["ttft_ms"].max_effect == 3.0
    seen.clear()
    assert runner.invoke(app, ["canary", "--stages", "10", "--stages", "100"]).exit_code == 3
    assert seen[0].live is None and seen[0].stages == [10.0, 100.0]
    missing = runner.invoke(app, ["canary", "--candidate-url", LIVE["candidate_url"]])
    assert missing.exit_code == 2 and "baseline_url" in missing.output


def test_flow_parameters_do_not_import_torch():
    """Every `fp4roll` command imports the parameter models: the live fields must not pull in the
    evaluator's torch-backed modules."""
    import subprocess
    import sys

    code = (
        "import sys, pipelines.params, pipelines.cli\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
