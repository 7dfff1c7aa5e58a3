"""Host memory stays flat: 50 small FedAvg rounds on digits, RSS at round 50 <= round 5 + 5 %.

Runs benchmarks/memory_flat.py (the real CLI, watched from outside); about a minute on a 2-core
CPU, so it is kept out of the default suite:
``python -m pytest -m slow tests/integration_tests/test_memory.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_rss_at_round_50_is_within_5_percent_of_round_5(tmp_path):
    out = tmp_path / "memory_flat.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_flat.py"), "--rounds", "50",
                          "--early", "5", "--out", str(out)], capture_output=True, text=True, timeout=1800)
    r = json.loads(out.read_text())
    assert r["returncode"] == 0, r.get("stderr_tail")
    rss = {int(k): v for k, v in r["rss_mb"].items()}
    assert sorted(rss) == list(range(1, 51)), "a round's window was missed"
    c = r["compare"]
    print(f"RSS round 5 {c['rss_early_mb']} MiB, round 50 {c['rss_late_mb']} MiB (x{c['rss_ratio']}); "
          f"telemetry peak {c.get('peak_early_mb')} -> {c.get('peak_late_mb')} MiB")
    assert c["rss_late_mb"] <= 1.05 * c["rss_early_mb"]
    assert c["peak_late_mb"] <= 1.05 * c["peak_early_mb"]
    assert r["ok"] and res.returncode == 0
