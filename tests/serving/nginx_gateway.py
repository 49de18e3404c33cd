"""The nginx gateway the canary drives (product code: :mod:`pipelines.canary.nginx`)."""

from pipelines.canary.nginx import (
    ROUTE_HEADER,
    ROUTE_KEY_HEADER,
    ROUTES,
    UPSTREAM_HEADER,
    WEIGHTS_PATH,
    GatewayConfig,
    NginxError,
    NginxGateway,
    nginx_binary,
    render_config,
)

__all__ = [
    "ROUTES",
    "ROUTE_HEADER",
    "ROUTE_KEY_HEADER",
    "UPSTREAM_HEADER",
    "WEIGHTS_PATH",
    "GatewayConfig",
    "NginxError",
    "NginxGateway",
    "nginx_binary",
    "render_config",
]
