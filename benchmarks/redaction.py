"""Redaction cost: adversarial 1 MiB prompts and the shipped logs (medians, throughput).

    python benchmarks/redaction.py [--repeat 3] [--size-mib 1]

Each adversarial input is 1 MiB of one pattern (runs of ``%``, ``@``, digits, base64, ``a@a.``,
keywords, phone-shaped groups ...). The redactor caps its input at ``MAX_REDACT_CHARS``; the table
also reports the same inputs cut to that cap (what the detectors actually see) so a regression in
the per-character cost shows even though the cap hides it. Baselines measured in the same run: a
``str.replace`` pass over the same text (memcpy-like floor) and one stdlib regex scan for ``@``.
Timings are medians of ``--repeat`` runs; on a shared machine treat them as indicative.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import re
import statistics
import string
import time

from calibration import redaction
from calibration.data import SAMPLE_PROMPT_LOGS
from calibration.redaction import MAX_REDACT_CHARS, redact_with_counts


def adversarial_inputs(size: int, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)

    def fill(unit: str) -> str:
        return (unit * (size // len(unit) + 1))[:size]

    def random_text(alphabet: str) -> str:
        return "".join(rng.choice(alphabet) for _ in range(size))

    return {
        "percent run": fill("%"),
        "a% run": fill("a%"),
        "@ run": fill("@"),
        "a@a. run": fill("a@a."),
        "a@a. words": fill("a@a. "),
        "long local part @": fill("a%" * 200 + "@x "),
        "digits": random_text(string.digits),
        "digits and spaces": random_text(string.digits + " "),
        "digit groups": fill("415 555 2671 "),
        "phone-ish punctuation": random_text(string.digits + " ()-.+"),
        "base64": random_text(string.ascii_letters + string.digits + "+/="),
        "hex": random_text("0123456789abcdef"),
        "keywords": fill("password=a secret: b api_key "),
        "colons": fill("a::1:"),
        "IBAN-ish": fill("DE89 3704 "),
        "newlines": fill("\n"),
        "spaces": fill(" "),
        "unicode": random_text("äöüßéèêñçøåæœ日本語中文한국어"),
        "private key headers": fill("-----BEGIN RSA PRIVATE KEY-----\n"),
    }


def shipped_prompts() -> list[str]:
    texts = []
    with gzip.open(SAMPLE_PROMPT_LOGS, "rt", encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            if "messages" in obj:
                texts.extend(m["content"] for m in obj["messages"])
            else:
                texts.append(obj["prompt"])
    return texts


def median_seconds(fn, repeat: int, clock=time.perf_counter) -> float:
    times = []
    for _ in range(repeat):
        started = clock()
        fn()
        times.append(clock() - started)
    return statistics.median(times)


def cpu_seconds(fn, repeat: int) -> float:
    """Median CPU time of this process: less sensitive than wall time to other load on the box."""
    return median_seconds(fn, repeat, time.process_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size-mib", type=float, default=1.0)
    args = parser.parse_args()
    size = int(args.size_mib * (1 << 20))

    started = time.perf_counter()
    redact_with_counts("warm up: detectors are built on first use, a@b.com")
    print(f"detector set-up (imports, first call): {time.perf_counter() - started:.2f} s\n")

    print(
        f"{'input (1 MiB unless cut)':28} {'wall s':>8} {'cpu s':>7} {'MiB/s':>6} {'cut wall s':>10} "
        f"{'replace s':>9} {'re @ s':>8}  counts"
    )
    worst = worst_cpu = 0.0
    for name, text in adversarial_inputs(size).items():
        full = median_seconds(lambda t=text: redact_with_counts(t), args.repeat)
        cpu = cpu_seconds(lambda t=text: redact_with_counts(t), args.repeat)
        capped = text[:MAX_REDACT_CHARS]
        cut = median_seconds(lambda t=capped: redact_with_counts(t), args.repeat)
        floor = median_seconds(lambda t=text: t.replace("\x00", ""), args.repeat)
        scan = median_seconds(lambda t=text: sum(1 for _ in re.finditer("@", t)), args.repeat)
        worst, worst_cpu = max(worst, full), max(worst_cpu, cpu)
        counts = redact_with_counts(capped).counts
        print(
            f"{name:28} {full:8.4f} {cpu:7.4f} {len(text) / full / (1 << 20):6.1f} {cut:10.4f} "
            f"{floor:9.5f} {scan:8.5f}  {dict(counts)}"
        )
    print(f"\nworst adversarial 1 MiB prompt: {worst:.3f} s wall, {worst_cpu:.3f} s CPU")

    prompts = shipped_prompts()
    chars = sum(map(len, prompts))

    def all_prompts() -> None:
        redaction._phone_spans.cache_clear()  # every repeat starts cold (the cache helps in real runs)
        for prompt in prompts:
            redact_with_counts(prompt)

    total = median_seconds(all_prompts, args.repeat)
    total_cpu = cpu_seconds(all_prompts, args.repeat)
    step = max(1, len(prompts) // 400)
    per_prompt = sorted(
        median_seconds(lambda p=p: redact_with_counts(p), 1) for p in prompts[::step]
    )
    print(
        f"shipped logs: {len(prompts)} messages, {chars / 1e6:.2f} M chars in {total:.2f} s wall, "
        f"{total_cpu:.2f} s CPU ({chars / total_cpu / 1e6:.2f} M chars per CPU second); "
        f"per message median {statistics.median(per_prompt) * 1e3:.2f} ms, "
        f"p99 {per_prompt[int(0.99 * (len(per_prompt) - 1))] * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
