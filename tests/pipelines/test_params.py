import pytest
from pydantic import ValidationError

from pipelines.params import (
    CanaryParams,
    DriftCheckParams,
    RecalibrateParams,
    RollbackParams,
    Scheme,
)


def test_defaults_are_valid_and_frozen():
    params = RecalibrateParams()
    assert params.scheme is Scheme.NVFP4 and params.kl_threshold == 0.05
    with pytest.raises(ValidationError):
        params.kl_threshold = 1.0  # frozen
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


def test_recalibrate_params_cross_field_checks():
    with pytest.raises(ValidationError, match="must be before"):
        RecalibrateParams(since="2026-02-01T00:00:00Z", until="2026-01-01T00:00:00Z")
    with pytest.raises(ValidationError, match="must be smaller than"):
        RecalibrateParams(calibration_size=8, sensitivity_prompts=16)
    with pytest.raises(ValidationError, match="reason"):
        RollbackParams()
