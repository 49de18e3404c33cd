"""Gate policy validation and round-trip; registry stays free of torch and prefect."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from registry.policy import (
    Direction,
    GatePolicy,
    MetricGate,
    StagePlan,
    gate_policy_as_dict,
    load_gate_policy,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults_match_design():
    policy = GatePolicy()
    latency = policy.metric("latency_ms")
    assert (latency.max_effect, latency.critical_effect) == (1.2, 1.5)
    assert latency.statistic.value == "p99" and latency.require_significance
    assert policy.metric("nll").max_effect == 1.01 and policy.metric("nll").critical
    assert policy.metric("top1_agreement").ceiling == 0.99
    assert policy.metric("top1_agreement").direction is Direction.HIGHER_IS_BETTER
    assert policy.metric("outlier_fallback_rate").ceiling == 0.005
    assert policy.plan.steps == (1.0, 10.0, 50.0, 100.0)
    assert policy.min_samples >= 2


def test_round_trip_through_json(tmp_path):
    policy = GatePolicy(confidence=0.95, plan=StagePlan(steps=(5, 25, 100), failure_limit=2))
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(gate_policy_as_dict(policy)))
    assert load_gate_policy(path) == policy
    assert load_gate_policy(None) == GatePolicy()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"confidnce": 0.9}, "confidnce"),
        ({"confidence": 1.5}, "confidence"),
        ({"plan": {"steps": [10, 5, 100]}}, "strictly increasing"),
        ({"plan": {"steps": [1, 50]}}, "end at 100"),
        ({"pass_score": 50, "marginal_score": 80}, "marginal_score"),
        (
            {"metrics": [{"name": "a", "direction": "lower"}, {"name": "a", "direction": "lower"}]},
            "duplicate",
        ),
        ({"metrics": [{"name": "a", "direction": "sideways"}]}, "direction"),
    ],
)
def test_bad_config_is_a_clear_error(config, message):
    with pytest.raises(ValidationError, match=message):
        load_gate_policy(config)


def test_metric_gate_validation():
    with pytest.raises(ValueError, match="critical_effect"):
        MetricGate(name="x", direction="lower", max_effect=1.5, critical_effect=1.2)
    with pytest.raises(ValueError, match="candidate-only"):
        MetricGate(name="x", direction="lower", comparison="candidate_only")
    with pytest.raises(ValueError, match="effect limits need a baseline"):
        MetricGate(
            name="x", direction="lower", comparison="candidate_only", ceiling=1, max_effect=1
        )
    with pytest.raises(FileNotFoundError):
        load_gate_policy("/nonexistent/policy.json")


def test_registry_imports_neither_torch_nor_prefect():
    code = (
        "import sys, importlib\n"
        "for name in ('registry', 'registry.policy', 'registry.judge', 'registry.mlflow_registry',"
        " 'registry.ledger'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        "        if exc.name != name: raise\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'prefect'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert out.stdout.strip() == "", f"registry imported: {out.stdout.strip()}"


def test_endpoint_metric_names_are_the_endpoint_gates():
    """``GatePolicyOverrides`` validates endpoint metric names against one enum: it must name
    exactly the gates an endpoint evaluator adds; the in-process replay refuses them."""
    from registry.policy import (
        EndpointMetric,
        GatePolicyOverrides,
        build_gate_policy,
        endpoint_metric_gates,
    )

    assert {g.name for g in endpoint_metric_gates()} == {m.value for m in EndpointMetric}
    overrides = GatePolicyOverrides(metric_overrides={"tpot_ms": {"max_effect": 2.0}})
    with pytest.raises(ValueError, match="endpoint evaluator only"):
        build_gate_policy((100.0,), 10, overrides)
