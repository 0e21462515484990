"""bandit, a static security linter, over api/ and keys/: no finding but the accepted ones in
.ci/bandit-baseline.toml (each with its reason), so a new one fails the suite and CI."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / ".ci" / "bandit-baseline.toml"


def _findings() -> list[tuple[str, str, str]]:
    """(test id, file, flagged line's text) for every finding of ``bandit -r api keys``."""
    proc = subprocess.run([sys.executable, "-m", "bandit", "-r", "api", "keys", "-f", "json", "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.stdout, proc.stderr  # bandit exits 1 when it finds anything; the JSON says what
    report = json.loads(proc.stdout)
    assert not report["errors"], report["errors"]
    found = []
    for result in report["results"]:
        path = Path(result["filename"])
        line = (ROOT / path).read_text().splitlines()[result["line_number"] - 1].strip()
        found.append((result["test_id"], path.as_posix(), line))
    return found


def test_bandit_finds_nothing_new() -> None:
    accepted = tomllib.loads(BASELINE.read_text())["accepted"]
    assert all(entry["why"].strip() for entry in accepted), "every accepted finding says why"
    allowed = {(e["test"], e["file"], e["line"]) for e in accepted}
    found = _findings()
    new = [f for f in found if f not in allowed]
    assert not new, "new bandit findings (fix them, or accept them in .ci/bandit-baseline.toml " \
        "with a reason):\n" + "\n".join(f"  {t} {f}: {line}" for t, f, line in new)
    stale = allowed - set(found)
    assert not stale, f"accepted findings bandit no longer reports (remove them): {sorted(stale)}"
