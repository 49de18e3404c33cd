"""An nginx gateway: two weighted upstreams (baseline, candidate), reloaded per stage.

nginx (Debian package ``nginx-light`` or ``nginx``) runs as a foreground, non-daemon process owned by
the test, listening on 127.0.0.1 on a free port; its pid, logs and temp paths live in a temp dir, so
nothing needs root beyond the package install.

Routing (generated config, see :func:`render_config`):

* ``split_clients`` on a per-request key sends ``candidate_percent`` % of requests to the candidate.
  The key is the client's ``X-Fp4roll-Route-Key`` header when given (sticky, deterministic: the same
  key always takes the same route at a given weight), else nginx's random ``$request_id``.
* ``X-Fp4roll-Route: baseline|candidate`` forces a route (mirrored replay through the gateway).
* Every proxied response carries ``X-Fp4roll-Upstream: baseline|candidate``, so a client observes the
  effective split, and the access log records it per request.
* ``GET /fp4roll/weights`` is answered by nginx itself from the config it has loaded: JSON with the
  candidate percent and a generation number bumped on every reload. Reading it back after a reload is
  how :meth:`NginxGateway.set_candidate_percent` knows the new weight is in force.
* Optional fault injection: ``candidate_error_percent`` makes that share of candidate-routed requests
  answer ``503`` from nginx (keyed like the split, so deterministic per route key). The same faults
  apply on a second listener, ``candidate_front_url``, which fronts the candidate alone: a client
  that mirrors traffic straight to "the candidate endpoint" sees the same error rate.

The gateway's folder (nginx's prefix) holds ``nginx.conf``, ``nginx.pid`` and ``gateway.json`` (the
ports and the :class:`GatewayConfig` in force, rewritten atomically with every change), so another
process, e.g. the canary flow, can take over a running gateway: :meth:`NginxGateway.attach` (it
reloads the nginx it finds there and never stops it).

Weight changes rewrite the config atomically, check it with ``nginx -t`` and send SIGHUP to the
master (what ``nginx -s reload`` does); old workers finish their in-flight requests (and requests that
arrive on connections they hold) with the old weights, so ``set_candidate_percent`` returns only when
nginx serves the new config and every old worker has exited.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from pipelines.canary.processes import free_port, stop_process

ROUTE_HEADER = "X-Fp4roll-Route"
ROUTE_KEY_HEADER = "X-Fp4roll-Route-Key"
UPSTREAM_HEADER = "X-Fp4roll-Upstream"
WEIGHTS_PATH = "/fp4roll/weights"
ROUTES = ("baseline", "candidate")
STATE_FILE = "gateway.json"  # ports and config of a running gateway, for attach()


class NginxError(RuntimeError):
    """nginx is missing, refused its config, or did not come up."""


def nginx_binary() -> str | None:
    """Path of the nginx executable, or None when it is not installed."""
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


@dataclass(frozen=True)
class GatewayConfig:
    """What the generated nginx config encodes. Percentages allow two decimals (nginx's precision)."""

    baseline: str  # "host:port" of the baseline endpoint
    candidate: str  # "host:port" of the candidate endpoint
    candidate_percent: float = 0.0
    candidate_error_percent: float = 0.0
    generation: int = 0

    def __post_init__(self) -> None:
        for name in ("candidate_percent", "candidate_error_percent"):
            value = getattr(self, name)
            if not 0.0 <= value <= 100.0:
                raise ValueError(f"{name} must lie in [0, 100], got {value}")
            if round(value, 2) != value:
                raise ValueError(f"{name} has more than two decimals (nginx's precision): {value}")


def _split_block(key: str, variable: str, share: float, hit: str, miss: str) -> list[str]:
    # nginx refuses a "0%" line; 100 % is written as the catch-all.
    if share <= 0.0:
        entries = [f"* {miss};"]
    elif share >= 100.0:
        entries = [f"* {hit};"]
    else:
        entries = [f"{share:g}% {hit};", f"* {miss};"]
    return [f'split_clients "{key}" {variable} {{', *(f"    {e}" for e in entries), "}"]


def _header_variable(header: str) -> str:
    return "$http_" + header.lower().replace("-", "_")


_INJECTED_FAULT_BODY = json.dumps(
    {"error": {"message": "injected fault", "type": "fp4roll_injected_fault", "code": 503}}
)


def _proxy_location(route_variable: str, fault_variable: str) -> list[str]:
    return [
        "location / {",
        f"    add_header {UPSTREAM_HEADER} {route_variable} always;",
        f"    if ({fault_variable}) {{",
        f"        add_header {UPSTREAM_HEADER} {route_variable} always;",
        f"        return 503 '{_INJECTED_FAULT_BODY}';",
        "    }",
        f"    proxy_pass http://{route_variable};",
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_buffering off;",  # server-sent events stream through unbuffered
        "    proxy_request_buffering off;",
        "    proxy_read_timeout 600s;",
        "}",
    ]


def _block(head: str, body: list[str]) -> list[str]:
    return [f"{head} {{", *(f"    {line}" for line in body), "}"]


def render_config(cfg: GatewayConfig, *, listen_port: int, front_port: int, workdir: Path) -> str:
    """The whole nginx.conf for ``cfg`` (pure function: tested on its own)."""
    weights_json = json.dumps(
        {
            "candidate_percent": cfg.candidate_percent,
            "baseline_percent": round(100.0 - cfg.candidate_percent, 2),
            "candidate_error_percent": cfg.candidate_error_percent,
            "generation": cfg.generation,
            "baseline": cfg.baseline,
            "candidate": cfg.candidate,
        },
        sort_keys=True,
    )
    temp = workdir / "temp"
    key_header = _header_variable(ROUTE_KEY_HEADER)
    http = [
        "log_format fp4roll '$msec $request_id $fp4roll_route $status $upstream_addr "
        '$request_time "$request"\';',
        f"access_log {workdir / 'access.log'} fp4roll;",
        *(f"{kind}_temp_path {temp / kind};" for kind in ("proxy", "fastcgi", "uwsgi", "scgi")),
        f"client_body_temp_path {temp / 'client_body'};",
        "client_max_body_size 16m;",
        f"upstream baseline {{ server {cfg.baseline}; keepalive 8; }}",
        f"upstream candidate {{ server {cfg.candidate}; keepalive 8; }}",
        # The split key: the client's route key (sticky) or nginx's random per-request id.
        *_block(f"map {key_header} $fp4roll_key", ['"" $request_id;', f"default {key_header};"]),
        *_split_block(
            "${fp4roll_key}", "$fp4roll_split", cfg.candidate_percent, "candidate", "baseline"
        ),
        *_block(
            f"map {_header_variable(ROUTE_HEADER)} $fp4roll_route",
            ["baseline baseline;", "candidate candidate;", "default $fp4roll_split;"],
        ),
        # Faults: a second split on the salted key, independent of the routing split.
        *_split_block(
            "fault${fp4roll_key}", "$fp4roll_fault", cfg.candidate_error_percent, "1", "0"
        ),
        *_block(
            "map $fp4roll_route$fp4roll_fault $fp4roll_inject", ["candidate1 1;", "default 0;"]
        ),
        *_block(
            "server",
            [
                f"listen 127.0.0.1:{listen_port};",
                *_block(
                    f"location = {WEIGHTS_PATH}",
                    ["default_type application/json;", f"return 200 '{weights_json}';"],
                ),
                *_proxy_location("$fp4roll_route", "$fp4roll_inject"),
            ],
        ),
        # The candidate alone behind the same faults, for clients that mirror traffic to it directly.
        *_block(
            "server",
            [
                f"listen 127.0.0.1:{front_port};",
                "set $fp4roll_front candidate;",
                *_proxy_location("$fp4roll_front", "$fp4roll_fault"),
            ],
        ),
    ]
    lines = []
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # A root master would drop workers to `nobody`, who cannot enter the 0700 temp dir.
        import pwd

        lines.append(f"user {pwd.getpwuid(0).pw_name};")
    lines += [
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        f"pid {workdir / 'nginx.pid'};",
        f"error_log {workdir / 'error.log'} notice;",
        "events { worker_connections 512; }",
        *_block("http", http),
    ]
    return "\n".join(lines) + "\n"


class NginxGateway:
    """A running nginx in front of two endpoints. Use as a context manager (or call close()).

    ``url`` is the gateway, ``candidate_front_url`` the candidate behind the same fault injection.
    """

    def __init__(
        self,
        baseline: str,
        candidate: str,
        *,
        candidate_percent: float = 0.0,
        candidate_error_percent: float = 0.0,
        workdir: str | os.PathLike | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        binary = nginx_binary()
        if binary is None:
            raise NginxError("nginx is not installed (Debian: apt-get install nginx-light)")
        self.binary = binary
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fp4roll-nginx-"))
        (self.workdir / "temp").mkdir(parents=True, exist_ok=True)
        self.conf_path = self.workdir / "nginx.conf"
        self.port = free_port()
        self.front_port = free_port()
        self.config = GatewayConfig(
            baseline=_hostport(baseline),
            candidate=_hostport(candidate),
            candidate_percent=candidate_percent,
            candidate_error_percent=candidate_error_percent,
        )
        self._write_config(self.config)
        self._check_config()
        self.proc: subprocess.Popen | None = subprocess.Popen(
            [
                binary,
                "-p",
                f"{self.workdir}/",
                "-e",
                str(self.workdir / "error.log"),
                "-c",
                str(self.conf_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            self._wait_for_generation(self.config.generation, startup_timeout)
        except Exception:
            self.close()
            raise

    @classmethod
    def attach(cls, workdir: str | os.PathLike) -> NginxGateway:
        """Take over the running gateway whose folder is ``workdir`` (started by another process
        with :class:`NginxGateway`): weights are set by rewriting its config and reloading its
        master (pid from ``nginx.pid``); :meth:`close` leaves it running. Raises
        :class:`NginxError` when nothing serves there, or nginx serves another config generation
        than the folder records (someone else changed it)."""
        binary = nginx_binary()
        if binary is None:
            raise NginxError("nginx is not installed (Debian: apt-get install nginx-light)")
        folder = Path(workdir)
        try:
            state = json.loads((folder / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise NginxError(f"no fp4roll gateway state in {folder}: {exc}") from None
        self = cls.__new__(cls)
        self.binary = binary
        self._own_dir = False
        self.workdir = folder
        self.conf_path = folder / "nginx.conf"
        self.port = int(state["port"])
        self.front_port = int(state["front_port"])
        self.config = GatewayConfig(**state["config"])
        self.proc = None
        self._require_running()
        self._require_generation(self.config.generation)
        return self

    def _require_generation(self, generation: int) -> None:
        served = self.effective_weights().get("generation")
        if served != generation:
            raise NginxError(
                f"nginx in {self.workdir} serves config generation {served}, this gateway knows "
                f"{generation}: another process changed it; attach again"
            )

    # -- public API -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def candidate_front_url(self) -> str:
        return f"http://127.0.0.1:{self.front_port}"

    def set_candidate_percent(
        self,
        percent: float,
        *,
        candidate_error_percent: float | None = None,
        timeout: float = 20.0,
    ) -> dict:
        """Rewrite the config with the new weight, reload nginx, and wait until nginx answers with
        it. Returns the weights nginx reports (see :meth:`effective_weights`). First checks that
        nginx still serves the config this object knows (else :class:`NginxError`: another
        process, e.g. an attached flow, changed it since; nothing is overwritten)."""
        self._require_generation(self.config.generation)
        cfg = GatewayConfig(
            baseline=self.config.baseline,
            candidate=self.config.candidate,
            candidate_percent=percent,
            candidate_error_percent=(
                self.config.candidate_error_percent
                if candidate_error_percent is None
                else candidate_error_percent
            ),
            generation=self.config.generation + 1,
        )
        self._write_config(cfg)
        try:
            self._check_config()
        except NginxError:
            self._write_config(self.config)  # the config (and state) in force stay on disk
            raise
        self.config = cfg
        old_workers = self.worker_pids()
        self.reload()
        weights = self._wait_for_generation(cfg.generation, timeout)
        # Old workers keep serving requests on connections they already hold (keep-alive, in-flight
        # streams) with the old weights until they exit: the new weight is in force for all traffic
        # only once they are gone.
        self._wait_for_exit(old_workers, timeout)
        return weights

    def reload(self) -> None:
        """SIGHUP to the master: re-read the config, start new workers, retire old ones."""
        self._require_running()
        os.kill(self.master_pid, signal.SIGHUP)

    @property
    def master_pid(self) -> int:
        """The nginx master: the process started here, else the one ``nginx.pid`` names."""
        if self.proc is not None:
            return self.proc.pid
        try:
            return int((self.workdir / "nginx.pid").read_text().strip())
        except (OSError, ValueError) as exc:
            raise NginxError(f"no nginx master pid in {self.workdir}: {exc}") from None

    def effective_weights(self) -> dict:
        """The weights in the config nginx has loaded, as nginx itself reports them."""
        response = httpx.get(f"{self.url}{WEIGHTS_PATH}", timeout=5)
        response.raise_for_status()
        return response.json()

    def loaded_config_percent(self) -> float:
        """The candidate percent written in the config file on disk (what the next reload loads)."""
        for line in self.conf_path.read_text().splitlines():
            stripped = line.strip()
            if stripped.endswith("% candidate;"):
                return float(stripped.split("%")[0])
            if stripped == "* candidate;":
                return 100.0
        return 0.0

    def worker_pids(self) -> set[int]:
        """Pids of the master's child processes (its workers), from /proc."""
        master = self.master_pid
        children = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:  # fields: state, ppid, ...
                children.add(int(stat.parent.name))
        return children

    def access_log_routes(self) -> list[str]:
        """The route of every request in the access log, in order."""
        path = self.workdir / "access.log"
        if not path.exists():
            return []
        return [line.split()[2] for line in path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        """Stop the nginx started here (an attached gateway is left running)."""
        proc = getattr(self, "proc", None)
        if proc is not None:
            stop_process(proc, sig=signal.SIGQUIT)  # SIGQUIT: graceful shutdown
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NginxGateway:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _write_config(self, cfg: GatewayConfig) -> None:
        text = render_config(
            cfg, listen_port=self.port, front_port=self.front_port, workdir=self.workdir
        )
        _atomic_write(self.conf_path, text)
        state = {"port": self.port, "front_port": self.front_port, "config": asdict(cfg)}
        _atomic_write(self.workdir / STATE_FILE, json.dumps(state, sort_keys=True) + "\n")

    def _check_config(self) -> None:
        result = subprocess.run(
            [
                self.binary,
                "-t",
                "-q",
                "-p",
                f"{self.workdir}/",
                "-e",
                str(self.workdir / "error.log"),
                "-c",
                str(self.conf_path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise NginxError(f"nginx -t refused {self.conf_path}: {result.stderr.strip()}")

    def _require_running(self) -> None:
        if self.proc is None:  # attached: the master must still be alive
            pid = self.master_pid
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                raise NginxError(f"the nginx master {pid} of {self.workdir} is gone") from None
            except PermissionError:
                pass  # alive, another user's
            return
        if self.proc.poll() is not None:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            log = self.workdir / "error.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise NginxError(f"nginx exited with {self.proc.returncode}: {err}{tail}")

    def _wait_for_exit(self, pids: set[int], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pids & self.worker_pids():
            if time.monotonic() > deadline:
                raise NginxError(f"old nginx workers {sorted(pids)} still alive after {timeout} s")
            time.sleep(0.05)

    def _wait_for_generation(self, generation: int, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            self._require_running()
            try:
                weights = self.effective_weights()
                if weights.get("generation") == generation:
                    return weights
                last = weights
            except (httpx.HTTPError, ValueError) as exc:
                last = exc
            time.sleep(0.05)
        raise NginxError(
            f"nginx did not serve config generation {generation} in {timeout} s: {last}"
        )


def _hostport(endpoint: str) -> str:
    """'http://127.0.0.1:8000/v1' or '127.0.0.1:8000' -> '127.0.0.1:8000'."""
    rest = endpoint.split("://", 1)[-1]
    return rest.split("/", 1)[0]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
