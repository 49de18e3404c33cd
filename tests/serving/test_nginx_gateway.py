"""The nginx gateway test support: generated config, weights applied by reload, observed split."""

from __future__ import annotations

import threading

import httpx
import pytest

from tests.serving.nginx_gateway import (
    ROUTE_HEADER,
    ROUTE_KEY_HEADER,
    UPSTREAM_HEADER,
    GatewayConfig,
    NginxGateway,
    nginx_binary,
    render_config,
)
from tests.serving.stub_upstream import StubUpstream

needs_nginx = pytest.mark.skipif(
    nginx_binary() is None, reason="nginx not installed (Debian: apt-get install nginx-light)"
)


# -- config rendering (no nginx needed) ---------------------------------------------------------


def _render(percent: float, errors: float = 0.0, tmp_path=None) -> str:
    cfg = GatewayConfig("127.0.0.1:1", "127.0.0.1:2", percent, errors)
    return render_config(cfg, listen_port=3, front_port=4, workdir=tmp_path)


def test_config_split_lines(tmp_path):
    zero = _render(0, tmp_path=tmp_path)
    assert "% candidate;" not in zero and "* baseline;" in zero  # nginx refuses "0%"
    ten = _render(10, tmp_path=tmp_path)
    assert "10% candidate;" in ten and "* baseline;" in ten
    assert "* candidate;" in _render(100, tmp_path=tmp_path)
    assert "1.25% candidate;" in _render(1.25, tmp_path=tmp_path)
    assert "3% 1;" in _render(10, 3, tmp_path=tmp_path)


@pytest.mark.parametrize("bad", [-1, 100.5, 0.001])
def test_config_refuses_bad_percent(bad):
    with pytest.raises(ValueError):
        GatewayConfig("a:1", "b:2", candidate_percent=bad)


# -- a real nginx -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstreams():
    with StubUpstream("baseline") as base, StubUpstream("candidate") as cand:
        yield base, cand


def _routes(client: httpx.Client, url: str, n: int, *, keyed: bool) -> list[str]:
    routes = []
    for i in range(n):
        headers = {ROUTE_KEY_HEADER: f"request-{i}"} if keyed else {}
        response = client.post(f"{url}/v1/completions", json={"prompt": str(i)}, headers=headers)
        assert response.status_code == 200, response.text
        # Independent oracle: the upstream names itself in the body; the header must agree.
        served_by = response.json()["upstream"]
        assert response.headers[UPSTREAM_HEADER] == served_by
        routes.append(served_by)
    return routes


@pytest.mark.integration
@needs_nginx
def test_weights_reload_and_observed_split(upstreams):
    base, cand = upstreams
    with NginxGateway(base.url, cand.url, candidate_percent=0) as gw, httpx.Client() as client:
        assert gw.effective_weights()["candidate_percent"] == 0
        assert set(_routes(client, gw.url, 30, keyed=False)) == {"baseline"}

        weights = gw.set_candidate_percent(10)
        assert weights["candidate_percent"] == 10 and weights["generation"] == 1
        assert gw.loaded_config_percent() == 10
        random_routes = _routes(client, gw.url, 200, keyed=False)
        share = random_routes.count("candidate")
        # Binomial(200, 0.1): 20 +- 4.2; outside [5, 40] has probability ~1e-5. 0 % or 50 % fail.
        assert 5 <= share <= 40, share

        keyed = _routes(client, gw.url, 200, keyed=True)
        assert 5 <= keyed.count("candidate") <= 40
        assert _routes(client, gw.url, 200, keyed=True) == keyed  # sticky per key

        forced = client.get(f"{gw.url}/v1/models", headers={ROUTE_HEADER: "candidate"})
        assert forced.json()["upstream"] == "candidate"

        gw.set_candidate_percent(100)
        assert set(_routes(client, gw.url, 20, keyed=False)) == {"candidate"}
        gw.set_candidate_percent(0)  # rollback
        assert gw.effective_weights()["candidate_percent"] == 0
        assert set(_routes(client, gw.url, 20, keyed=False)) == {"baseline"}
        log_routes = gw.access_log_routes()
        assert log_routes.count("candidate") >= share + 20


@pytest.mark.integration
@needs_nginx
def test_reload_keeps_in_flight_requests(upstreams):
    base, cand = upstreams
    with NginxGateway(base.url, cand.url, candidate_percent=0) as gw:
        result = {}

        def slow():
            result["r"] = httpx.get(f"{gw.url}/slow?sleep=1.5", timeout=30)

        base.sleeping.clear()
        thread = threading.Thread(target=slow)
        thread.start()
        assert base.sleeping.wait(timeout=20)  # routed to the baseline under the old config
        gw.set_candidate_percent(100)
        thread.join(timeout=30)
        assert result["r"].status_code == 200
        assert result["r"].json()["upstream"] == "baseline"


@pytest.mark.integration
@needs_nginx
def test_injected_candidate_errors(upstreams):
    base, cand = upstreams
    with (
        NginxGateway(base.url, cand.url, candidate_percent=0, candidate_error_percent=3) as gw,
        httpx.Client() as client,
    ):
        statuses = [
            client.post(
                f"{gw.candidate_front_url}/v1/completions",
                json={},
                headers={ROUTE_KEY_HEADER: f"request-{i}"},
            ).status_code
            for i in range(300)
        ]
        errors = statuses.count(503)
        assert set(statuses) <= {200, 503}
        assert 2 <= errors <= 20, errors  # 9 expected
        failed = client.post(
            f"{gw.candidate_front_url}/v1/completions",
            json={},
            headers={ROUTE_KEY_HEADER: f"request-{statuses.index(503)}"},
        )
        assert failed.status_code == 503  # deterministic per key
        assert failed.json()["error"]["type"] == "fp4roll_injected_fault"
        # Baseline-routed traffic at the gateway never sees the candidate's faults.
        assert {
            client.get(gw.url, headers={ROUTE_KEY_HEADER: f"request-{i}"}).status_code
            for i in range(100)
        } == {200}


@pytest.mark.integration
@needs_nginx
def test_attach_takes_over_a_running_gateway(upstreams, tmp_path):
    """Another process (the canary flow) attaches to the gateway by its folder: it sets weights by
    rewriting the config and reloading the master, and leaves nginx running when it is done."""
    from tests.serving.nginx_gateway import NginxError

    base, cand = upstreams
    with NginxGateway(base.url, cand.url, workdir=tmp_path / "gw") as owner:
        attached = NginxGateway.attach(tmp_path / "gw")
        assert attached.url == owner.url and attached.master_pid == owner.proc.pid
        assert attached.set_candidate_percent(50)["candidate_percent"] == 50
        assert owner.effective_weights()["candidate_percent"] == 50  # nginx itself says so
        attached.close()
        assert owner.proc.poll() is None  # still serving
        with pytest.raises(NginxError, match="serves config generation"):
            owner.set_candidate_percent(10)  # a stale view is refused, never overwrites
        again = NginxGateway.attach(tmp_path / "gw")
        assert again.config.candidate_percent == 50 and again.config.generation == 1
        assert again.set_candidate_percent(0)["generation"] == 2
        assert again.loaded_config_percent() == 0 == owner.effective_weights()["candidate_percent"]
    with pytest.raises(NginxError, match="no fp4roll gateway state"):
        NginxGateway.attach(tmp_path / "nowhere")
