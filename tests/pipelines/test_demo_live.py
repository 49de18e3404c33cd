"""The live demo's plain parts (``pipelines/demo_live.py``) without servers: the log subset, the
GGUF version folder, its own home and environment, the flow parameters it builds, the gateway
weights read back per stage and how they are printed, the ``fp4roll demo`` options. The demo itself
(servers, nginx, the flow) runs in ``tests/serving/test_canary_flow.py``'s setup and by hand."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipelines.canary.llamacpp import GGUFChatTemplate, render_chat_template
from pipelines.demo_live import (
    HOME_MARKER,
    LIVE_DEMO,
    LIVE_DEMO_GATES,
    demo_environment,
    gguf_version_folder,
    live_canary_params,
    live_demo_home,
    stage_figures,
    write_short_logs,
)
from pipelines.params import RouterKind
from pipelines.render import print_stages
from pipelines.results import CanaryOutcome, CanaryRecord, StageReport
from pipelines.rollout import gateway_weights
from registry import db, ledger
from registry.judge import Decision, Outcome

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_short_logs_keep_the_routes_cut_short_without_duplicates(tmp_path):
    path = write_short_logs(tmp_path / "logs.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    routes = [r["metadata"]["route"] for r in records]
    assert sorted(set(routes)) == sorted(LIVE_DEMO.routes)
    assert all(routes.count(r) == LIVE_DEMO.logs_per_route for r in LIVE_DEMO.routes)
    contents = [m["content"] for r in records for m in r["messages"]]
    assert max(len(c) for c in contents) == LIVE_DEMO.max_chars  # cut, and some were longer
    assert len({json.dumps(r["messages"]) for r in records}) == len(records)


def test_gguf_chat_template_renders_what_the_server_sees():
    messages = [{"role": "user", "content": "hi"}]
    renderer = GGUFChatTemplate(TEMPLATE)
    text = renderer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert text == render_chat_template(TEMPLATE, messages)
    with pytest.raises(ValueError, match="generation prompt"):
        renderer.apply_chat_template(messages, tokenize=True)


def test_gguf_version_folder_links_the_file_and_says_what_it_is(tmp_path):
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF" * 16)
    folder = gguf_version_folder(gguf, tmp_path / "version", "Q8_0")
    assert (folder / gguf.name).read_bytes() == gguf.read_bytes()
    assert json.loads((folder / "serving.json").read_text())["quantization"] == "Q8_0"
    again = gguf_version_folder(gguf, folder, "Q8_0")  # a rerun: same content
    assert sorted(p.name for p in again.iterdir()) == ["model.Q8_0.gguf", "serving.json"]
    inside = gguf_version_folder(folder / gguf.name, folder, "Q8_0")  # the file is already there
    assert (inside / gguf.name).read_bytes() == b"GGUF" * 16


def test_live_demo_home_is_fresh_and_never_wipes_a_foreign_folder(tmp_path):
    home = live_demo_home(tmp_path)
    assert (home / HOME_MARKER).is_file()
    (home / "old-state").write_text("from the last run")
    assert not (live_demo_home(tmp_path) / "old-state").exists()
    foreign = tmp_path / "other"
    (foreign / "live-demo").mkdir(parents=True)
    (foreign / "live-demo" / "keep").write_text("not ours")
    with pytest.raises(RuntimeError, match="not made by the live demo"):
        live_demo_home(foreign)
    assert (foreign / "live-demo" / "keep").exists()


def test_demo_environment_points_at_its_home_and_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("FP4ROLL_HOME", "/somewhere/else")
    monkeypatch.setenv("FP4ROLL_DB_URL", "postgresql://db.internal/fp4roll")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with demo_environment(tmp_path):
        assert os.environ["FP4ROLL_HOME"] == str(tmp_path)
        assert "FP4ROLL_DB_URL" not in os.environ and "MLFLOW_TRACKING_URI" not in os.environ
    assert os.environ["FP4ROLL_HOME"] == "/somewhere/else"
    assert os.environ["FP4ROLL_DB_URL"] == "postgresql://db.internal/fp4roll"
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_live_canary_params_drive_the_gateway_with_the_stated_gates(tmp_path):
    gateway = SimpleNamespace(candidate_front_url="http://127.0.0.1:9002", workdir=tmp_path)
    params = live_canary_params("m", "http://127.0.0.1:9001", gateway)
    assert params.live.router is RouterKind.NGINX and params.live.nginx_dir == str(tmp_path)
    assert params.live.candidate_url == "http://127.0.0.1:9002" and params.live.reuse_records
    assert params.gate_policy == LIVE_DEMO_GATES
    gates = {g.name: g for g in params.policy().metrics}
    assert gates["latency_ms"].enforced and gates["latency_ms"].max_effect == 3.0
    assert gates["ttft_ms"].critical_effect == 5.0
    assert gates["nll"].max_effect == 1.10
    assert tuple(params.stages) == LIVE_DEMO.stages


def test_gguf_versions_are_registered_and_served_from_their_verified_copies(tmp_path, monkeypatch):
    """The baseline becomes champion, the candidate challenger without made-up figures; each
    alias resolves to the GGUF bytes it registered; a changed byte is refused."""
    from pipelines.demo_live import (
        LiveStore,
        register_gguf_candidate,
        served_gguf,
    )
    from registry.integrity import IntegrityError
    from registry.mlflow_registry import aliases
    from registry.versions import register_baseline

    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base, cand = tmp_path / "base.Q4_1.gguf", tmp_path / "cand.Q8_0.gguf"
    base.write_bytes(b"Q4_1" * 64)
    cand.write_bytes(b"Q8_0" * 64)
    info, _ = register_baseline("m", gguf_version_folder(base, tmp_path / "v-base", "Q4_1"))
    store = LiveStore("ab" * 32, 2, 12, 60, info.version)
    version = register_gguf_candidate("m", cand, "Q8_0", store, tmp_path / "v-cand")
    assert aliases("m") == {"champion": info.version, "challenger": version}
    assert served_gguf("m", "champion").read_bytes() == base.read_bytes()
    served = served_gguf("m", "challenger")
    assert served.read_bytes() == cand.read_bytes()
    served.write_bytes(b"Q2_K" * 64)  # the bytes under the version changed
    with pytest.raises(IntegrityError):
        served_gguf("m", "challenger")


def _stage(index: int, percent: float, decision: Decision, failed=()) -> StageReport:
    return StageReport(
        rollout_id=1,
        stage_index=index,
        traffic_percent=percent,
        requests=6,
        outcome=Outcome.FAIL if failed else Outcome.PASS,
        decision=decision,
        score=50.0,
        reason="r",
        failed_metrics=tuple(failed),
        metrics={"kl_mean": {"baseline": 0.0, "candidate": 0.37, "verdict": "fail"}},
        replay_path="x.json",
    )


def test_gateway_weights_per_stage_and_their_column(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    db.upgrade(url)
    rollout = ledger.start_rollout("m", "2", "1", (10.0, 100.0), db_url=url)
    journal = [  # intent/applied of stage 0, then the rollback to 0; a reconcile has no stage
        (0.0, ledger.WeightPhase.APPLIED, None),
        (10.0, ledger.WeightPhase.INTENT, 0),
        (10.0, ledger.WeightPhase.APPLIED, 0),
        (0.0, ledger.WeightPhase.INTENT, 0),
        (0.0, ledger.WeightPhase.APPLIED, 0),
    ]
    for percent, phase, stage in journal:
        ledger.record_weight(rollout.id, percent, phase, router="nginx", stage=stage, db_url=url)
    weights = gateway_weights(rollout.id, url)
    assert weights == {0: (10.0, 0.0)}

    record = CanaryRecord(
        model_name="m",
        rollout_id=rollout.id,
        candidate_version="2",
        baseline_version="1",
        outcome=CanaryOutcome.ROLLED_BACK,
        stages=(_stage(0, 10.0, Decision.ROLLBACK, failed=("kl_mean",)),),
    )
    console = Console(record=True, width=160)
    print_stages(console, record, gateway_weights=weights)
    text = console.export_text()
    assert "weight at gateway" in text and "10 → 0 %" in text
    plain = Console(record=True, width=160)
    print_stages(plain, record)
    assert "weight at gateway" not in plain.export_text()
    assert stage_figures(record) == ["kl_mean: 0 → 0.37 (fail)"]


def test_demo_candidate_needs_live():
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["demo", "--candidate", "Q2_K"])
    assert result.exit_code == 2
    assert "--candidate needs --live" in result.output


def test_demo_help_names_the_live_path():
    from pipelines.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--live" in result.output and "Q2_K" in result.output


@pytest.fixture(autouse=True)
def _no_real_home(tmp_path, monkeypatch):
    """No test here touches the user's FP4ROLL_HOME."""
    monkeypatch.setenv("FP4ROLL_HOME", str(tmp_path / "home"))
