"""Prefect flows and tasks, deployments and the `fp4roll` CLI."""
