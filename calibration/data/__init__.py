"""Data shipped with fp4roll: sample production prompt logs (see ``make_sample_logs.py``)."""

from pathlib import Path

SAMPLE_PROMPT_LOGS = Path(__file__).resolve().parent / "sample_prompt_logs.jsonl.gz"
