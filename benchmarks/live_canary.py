"""The live canary end to end on this machine (``make demo-live``): real servers, a real gateway.

    PYTHONPATH=. .venv/bin/python -m benchmarks.live_canary [--candidate Q8_0|Q2_K|AA] [--prompts 12]

1. requantizes the packaged SmolLM2 GGUF with llama.cpp (``Q8_0`` = a good candidate, ``Q2_K`` = a
   damaged one; ``AA`` = the baseline file itself, the A/A noise floor);
2. starts llama.cpp's OpenAI-compatible server on the baseline and on the candidate, and nginx in
   front of both (weighted upstreams, reloaded per stage);
3. opens a rollout in a ledger (SQLite in ``--workdir``), then runs the stages 10 → 50 → 100 %:
   the weight is journaled and set at nginx and read back, the stage's share of the held-out
   requests (shipped logs, chat template of the GGUF) is mirrored to both endpoints, the judge
   decides per pool and per route; a rollback puts the weight to 0 first;
4. prints each stage (weight read back from nginx, requests, outcome, failed gates) and per-gate
   figures, and writes the per-request records (``live-stage-K.json``) and a summary JSON.

No MLflow here: the "versions" are GGUF labels and a promotion is recorded as the champion label
moving in the ledger (the gateway then sends 100 % to the candidate). Wall times on the shared
2-core machine are dominated by llama.cpp's server sorting its whole vocabulary in Python for
every echoed position (~0.1 s per position).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from benchmarks.serving_candidates import pick_prompts
from calibration.models import smollm2_gguf_path
from pipelines.canary.endpoints import CanaryRequest, ClientSettings, Endpoint, EndpointEvaluator
from pipelines.canary.judging import build_endpoint_policy
from pipelines.canary.live import LedgerWeightJournal, ledger_stage_recorder, run_live_canary
from pipelines.canary.llamacpp import LlamaServer, quantize_gguf, render_chat_template
from pipelines.canary.nginx import NginxGateway
from pipelines.canary.router import NginxRouter
from registry import db, ledger
from registry.aliases import Alias, AliasMove
from registry.judge import Decision


def _holdout(source: Path, count: int, max_chars: int) -> list[CanaryRequest]:
    import gguf

    template = bytes(
        gguf.GGUFReader(str(source)).fields["tokenizer.chat_template"].parts[-1]
    ).decode()
    prompts = pick_prompts(count, max_chars)
    return [
        CanaryRequest(render_chat_template(template, p["messages"]), route=p["route"])
        for p in prompts
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidate", default="Q8_0", help="Q8_0, Q2_K, ... or AA")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--max-chars", type=int, default=60, help="cut each message's content")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--min-samples", type=int, default=6)
    parser.add_argument("--route-min-samples", type=int, default=5)
    parser.add_argument("--steps", type=float, nargs="+", default=[10.0, 50.0, 100.0])
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    source = smollm2_gguf_path()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fp4roll-live-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.candidate.upper() == "AA":
        candidate_path = source
    else:
        candidate_path = workdir / f"smollm2-{args.candidate}.gguf"
        if not candidate_path.exists():
            quantize_gguf(source, candidate_path, args.candidate)
    holdout = _holdout(source, args.prompts, args.max_chars)
    db_url = f"sqlite:///{workdir / 'ledger.db'}"
    db.upgrade(db_url)
    # latency is enforced; its limits are widened here because three processes share 2 cores
    policy = build_endpoint_policy(
        args.steps,
        args.min_samples,
        {
            "metric_overrides": {
                name: {"max_effect": 3.0, "critical_effect": 5.0}
                for name in ("latency_ms", "ttft_ms", "tpot_ms")
            }
        },
    )
    started = time.perf_counter()
    with (
        LlamaServer(source, alias="smollm2") as base,
        LlamaServer(candidate_path, alias="smollm2") as cand,
        NginxGateway(base.url, cand.url) as gateway,
    ):
        rollout = ledger.start_rollout(
            "smollm2-gguf", args.candidate, "Q4_1", args.steps, db_url=db_url
        )
        router = NginxRouter(gateway)
        evaluator = EndpointEvaluator(
            baseline=Endpoint(base.url, "smollm2", flavor="llamacpp"),
            candidate=Endpoint(gateway.candidate_front_url, "smollm2", flavor="llamacpp"),
            settings=ClientSettings(concurrency=2, max_tokens=args.max_tokens, read_timeout_s=600),
        )
        result = run_live_canary(
            evaluator,
            router,
            holdout,
            policy=policy,
            journal=LedgerWeightJournal(rollout.id, router.name, db_url),
            replay_dir=workdir,
            route_min_samples=args.route_min_samples,
            on_stage=ledger_stage_recorder(rollout.id, db_url),
        )
        final_weight = gateway.effective_weights()["candidate_percent"]
        reason = result.stages[-1].verdict.reason
        if result.decision is Decision.PROMOTE:
            move = AliasMove(
                model_name="smollm2-gguf",
                alias=Alias.CHAMPION,
                from_version="Q4_1",
                to_version=args.candidate,
                reason="live canary: every stage passed, gateway at 100 %",
            )
            ledger.mark_promoted(rollout.id, [move], db_url=db_url)
        elif result.decision is Decision.ROLLBACK:
            ledger.mark_rolled_back(rollout.id, reason[:500], db_url=db_url)
        else:
            ledger.pause(rollout.id, reason[:500], db_url=db_url)
    seconds = time.perf_counter() - started

    print(f"\nlive canary of {args.candidate} against the packaged Q4_1 ({len(holdout)} held-out)")
    print("| stage | weight at nginx | requests | errors | outcome | decision | failed gates |")
    print("|---|---|---|---|---|---|---|")
    for stage in result.stages:
        v = stage.verdict
        print(
            f"| {stage.stage_index} | {stage.weight_applied:g} % | {len(stage.request_indices)} "
            f"| {stage.replay.num_errors} | {v.outcome.value} | {stage.decision.value} "
            f"| {', '.join(v.failed_metrics) or '-'} |"
        )
    last = result.stages[-1]
    figures = {
        m.metric: {
            "candidate": m.candidate_statistic,
            "baseline": m.baseline_statistic,
            "verdict": m.verdict.value,
        }
        for m in last.verdict.metrics
    }
    for name in (
        "top1_agreement",
        "kl_mean",
        "kl_p99",
        "nll",
        "error_rate",
        "latency_ms",
        "ttft_ms",
    ):
        if name in figures:
            print(f"  {name}: {figures[name]}")
    journal = [
        (w.phase.value, w.candidate_percent, w.stage)
        for w in ledger.traffic_weights(rollout.id, db_url=db_url)
    ]
    print(
        f"decision {result.decision.value}; nginx now at {final_weight:g} %; weight journal {journal}"
    )
    print(f"ledger: {db_url}; records in {workdir}; {seconds:.0f} s")
    summary = {
        "candidate": args.candidate,
        "decision": result.decision.value,
        "final_weight": final_weight,
        "weights_read_back": [s.weight_applied for s in result.stages],
        "stages": [
            {
                "stage": s.stage_index,
                "requests": len(s.request_indices),
                "errors": s.replay.num_errors,
                "outcome": s.verdict.outcome.value,
                "decision": s.decision.value,
                "failed": list(s.verdict.failed_metrics),
                "summary": s.replay.summary(),
            }
            for s in result.stages
        ],
        "last_stage_metrics": figures,
        "seconds": seconds,
    }
    (workdir / "live_canary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
