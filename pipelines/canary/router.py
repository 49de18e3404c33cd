"""Traffic routers: where the candidate's share of live traffic is set and read back.

:class:`TrafficRouter` is the protocol a canary stage drives: ``set_candidate_percent`` returns only
once the gateway serves the new weight and reports it (read-back), ``candidate_percent`` reads the
weight in force. Implementations:

* :class:`NginxRouter`: a real nginx (:class:`pipelines.canary.nginx.NginxGateway`), weights by
  ``split_clients``, reloaded per stage; the weight read back from nginx itself.
* :class:`ReplayOnlyRouter`: no gateway (the in-process replay, or an operator who only mirrors
  held-out traffic): remembers the weight so the ledger and the stage driver behave the same.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable


class RouterError(RuntimeError):
    """The gateway did not take or does not report the requested weight."""


@runtime_checkable
class TrafficRouter(Protocol):
    """Sets and reads the candidate's share of traffic, in percent (0 = all on the baseline)."""

    name: str

    def set_candidate_percent(self, percent: float) -> float:
        """Apply ``percent`` and return the weight the gateway reports afterwards."""
        ...

    def candidate_percent(self) -> float:
        """The weight in force, as the gateway reports it."""
        ...


def _check_percent(percent: float) -> float:
    value = float(percent)
    if not (math.isfinite(value) and 0.0 <= value <= 100.0):
        raise RouterError(f"candidate percent must lie in [0, 100], got {percent!r}")
    return round(value, 2)  # nginx's split_clients precision


class ReplayOnlyRouter:
    """No gateway: the weight is remembered (mirrored replay decides nothing about live traffic)."""

    name = "replay-only"

    def __init__(self, percent: float = 0.0) -> None:
        self._percent = _check_percent(percent)
        self.history: list[float] = []

    def set_candidate_percent(self, percent: float) -> float:
        self._percent = _check_percent(percent)
        self.history.append(self._percent)
        return self._percent

    def candidate_percent(self) -> float:
        return self._percent


class NginxRouter:
    """:class:`TrafficRouter` on a running :class:`~pipelines.canary.nginx.NginxGateway`."""

    name = "nginx"

    def __init__(self, gateway) -> None:
        self.gateway = gateway
        self.history: list[float] = []  # weights read back after each set

    def set_candidate_percent(self, percent: float) -> float:
        wanted = _check_percent(percent)
        reported = float(self.gateway.set_candidate_percent(wanted)["candidate_percent"])
        if reported != wanted:
            raise RouterError(f"nginx reports candidate {reported} % after setting {wanted} %")
        self.history.append(reported)
        return reported

    def candidate_percent(self) -> float:
        return float(self.gateway.effective_weights()["candidate_percent"])
