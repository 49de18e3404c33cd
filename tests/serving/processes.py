"""Process helpers shared by the server fixtures (they live in :mod:`pipelines.canary.processes`)."""

from pipelines.canary.processes import free_port, stop_process

__all__ = ["free_port", "stop_process"]
