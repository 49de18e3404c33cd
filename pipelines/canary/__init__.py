"""The canary: evaluators against live endpoints, traffic routers, per-route judging."""
