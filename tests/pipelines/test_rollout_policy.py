import pytest
from pydantic import ValidationError

from pipelines.params import IN_PROCESS_REPORTED_ONLY, CanaryParams
from registry.policy import GatePolicyOverrides, Metric, build_gate_policy


def test_in_process_policy_reports_latency_only_and_keeps_design_defaults():
    policy = CanaryParams(stages=[1, 10, 50, 100], min_samples=50).policy()
    assert policy.plan.steps == (1.0, 10.0, 50.0, 100.0) and policy.min_samples == 50
    enforced = {m.name: m.enforced for m in policy.metrics}
    assert [name for name, on in enforced.items() if not on] == list(IN_PROCESS_REPORTED_ONLY)
    assert policy.metric(Metric.TOP1_AGREEMENT).ceiling == 0.99
    assert policy.metric(Metric.OUTLIER_FALLBACK_RATE).ceiling == 0.005


def test_metric_overrides_change_named_gates_only():
    overrides = GatePolicyOverrides.model_validate(
        {"metric_overrides": {"kl_mean": {"ceiling": 0.2}}, "confidence": 0.95}
    )
    policy = build_gate_policy([5, 100], 20, overrides)
    assert policy.metric(Metric.KL_MEAN).ceiling == 0.2 and policy.confidence == 0.95
    assert policy.metric(Metric.KL_P99).ceiling == 0.5 and policy.min_samples == 20
    assert all(gate.enforced for gate in policy.metrics)  # nothing reported-only unless asked


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"metric_overrides": {"kl_maen": {"ceiling": 0.2}}}, "kl_maen"),
        ({"metric_overrides": {"kl_mean": {"ceilng": 0.2}}}, "ceilng"),
        ({"confidance": 0.9}, "confidance"),
        ({"confidence": 1.5}, "confidence must be in"),  # the built policy's own check
        ({"metric_overrides": {"top1_agreement": {"enforced": False}}, "metrics": []}, "not both"),
    ],
)
def test_invalid_overrides_are_refused_at_the_edge(overrides, message):
    with pytest.raises(ValidationError, match=message):
        CanaryParams(gate_policy=overrides)


def test_null_removes_a_limit_and_unset_fields_keep_the_default():
    overrides = GatePolicyOverrides.model_validate(
        {"metric_overrides": {"latency_ms": {"critical_effect": None}}}
    )
    gate = build_gate_policy([100], 20, overrides).metric(Metric.LATENCY_MS)
    assert gate.critical_effect is None and gate.max_effect == 1.2


def test_demo_gates_loosen_only_the_named_limits():
    from pipelines.demo import SMOLLM2_DEMO_GATES

    demo = CanaryParams(gate_policy=SMOLLM2_DEMO_GATES).policy()
    production = CanaryParams().policy()
    assert demo.metric(Metric.TOP1_AGREEMENT).ceiling == 0.68
    assert demo.metric(Metric.KL_MEAN).ceiling == 0.40 and demo.metric(Metric.KL_P99).ceiling == 3.0
    assert demo.metric(Metric.NLL).max_effect == 1.6
    unchanged = Metric.OUTLIER_FALLBACK_RATE, Metric.LATENCY_MS
    assert all(demo.metric(m) == production.metric(m) for m in unchanged)
    assert demo.plan == production.plan and demo.min_samples == production.min_samples
