"""infra/prefect.yaml: every deployment names a flow of pipelines/flows.py and its parameters are
valid for that flow (the same pydantic models the Prefect UI renders)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prefect.exceptions import ParameterTypeError, SignatureMismatchError

from pipelines import flows

PREFECT_YAML = Path(__file__).resolve().parents[2] / "infra" / "prefect.yaml"


def _deployments() -> list[dict]:
    return yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))["deployments"]


@pytest.mark.parametrize("deployment", _deployments(), ids=lambda d: d["entrypoint"])
def test_deployment_parameters_validate_against_the_flow(deployment):
    path, name = deployment["entrypoint"].split(":")
    assert path == "pipelines/flows.py"
    flow = getattr(flows, name)
    parameters = deployment.get("parameters", {})
    required = set(flow.parameters.required or ())
    if not required <= set(parameters):  # asked for at run time (rollback: the reason)
        assert parameters == {}, "give a flow's parameter model whole, or not at all"
        return
    validated = flow.validate_parameters(parameters)  # raises on an unknown or invalid field
    assert set(validated) == set(flow.parameters.properties)


def test_a_misplaced_parameter_is_refused():
    """The mistake this file had: fields of RecalibrateParams at the top level, beside ``params``."""
    with pytest.raises(SignatureMismatchError, match="model_name"):
        flows.recalibrate_flow.validate_parameters({"model_name": "x"})
    with pytest.raises(ParameterTypeError, match="scheme"):
        flows.recalibrate_flow.validate_parameters({"params": {"scheme": "nvfp4"}})
