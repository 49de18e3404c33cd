"""README's file and module table lists exactly the modules of the tree (outside tests)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "calibration", "registry", "pipelines", "benchmarks")


def _modules_in_tree() -> set[str]:
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if path.name == "__init__.py" or "/migrations/versions/" in relative:
                continue
            found.add(relative)
    return found


def _modules_in_readme() -> set[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Files and modules", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([\w/]+\.py)` \|", section, flags=re.MULTILINE))


def test_readme_module_table_matches_the_tree():
    in_tree, in_readme = _modules_in_tree(), _modules_in_readme()
    assert in_readme, "no module rows found under '### Files and modules'"
    assert not in_tree - in_readme, f"modules missing from README: {sorted(in_tree - in_readme)}"
    assert not in_readme - in_tree, (
        f"README lists modules that do not exist: {sorted(in_readme - in_tree)}"
    )


def test_tree_scan_sees_tracked_modules():
    """The scan above is not vacuous: it sees what git tracks."""
    tracked = subprocess.run(
        ["git", "ls-files", "--", *PACKAGES], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    if tracked:  # a git checkout
        assert "pipelines/flows.py" in tracked and "pipelines/flows.py" in _modules_in_tree()
