import pytest

from pipelines.rollout import IN_PROCESS_REPORTED_ONLY, build_gate_policy


def test_in_process_policy_reports_latency_only_and_keeps_design_defaults():
    policy = build_gate_policy([1, 10, 50, 100], 50)
    assert policy.plan.steps == (1.0, 10.0, 50.0, 100.0) and policy.min_samples == 50
    enforced = {m.name: m.enforced for m in policy.metrics}
    assert [name for name, on in enforced.items() if not on] == list(IN_PROCESS_REPORTED_ONLY)
    assert policy.metric("top1_agreement").ceiling == 0.99
    assert policy.metric("outlier_fallback_rate").ceiling == 0.005


def test_metric_overrides_change_named_gates_only():
    policy = build_gate_policy(
        [5, 100], 20, {"metric_overrides": {"kl_mean": {"ceiling": 0.2}}, "confidence": 0.95}
    )
    assert policy.metric("kl_mean").ceiling == 0.2 and policy.confidence == 0.95
    assert policy.metric("kl_p99").ceiling == 0.5
    with pytest.raises(ValueError, match="unknown metrics"):
        build_gate_policy([100], 20, {"metric_overrides": {"kl_maen": {"ceiling": 0.2}}})
    with pytest.raises(Exception, match="ceilng"):
        build_gate_policy([100], 20, {"metric_overrides": {"kl_mean": {"ceilng": 0.2}}})
