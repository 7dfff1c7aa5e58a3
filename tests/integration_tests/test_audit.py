"""``fedrun audit RUN_DIR`` as users run it, a real process on a trained run: it must audit the
run's EMA at its newest checkpoint and write the audit.json that ``fedrun report`` reads, and a
bad run directory or option is one error line. (The attack and the memorisation test
themselves, in-process: tests/unit_tests/test_audit_measures.py.)"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import as_args, run_cli, tiny_overrides


@pytest.mark.slow  # ~15 s: trains, then audits
def test_audit_of_a_trained_run_writes_audit_json(tmp_path):
    run_dir = tmp_path / "audited"
    # bad input: one line naming the fix, the FedrunError exit code (checked while the run trains)
    bad_inputs = ((["audit", str(tmp_path / "nowhere")], 2, "config.toml"),
                  (["audit", str(run_dir), "--samples", "many"], 2, "--samples"),
                  (["audit", str(run_dir), "--sample", "3"], 2, "unrecognized"))
    with ThreadPoolExecutor(1) as pool:
        bad_runs = pool.map(run_cli, [args for args, _, _ in bad_inputs])
        trained = run_cli(as_args(tiny_overrides(tmp_path, "audited", ema__sigma_rel=0.1)))
        for (_, code, text), bad in zip(bad_inputs, list(bad_runs), strict=True):
            errors = [line for line in bad.stderr.splitlines() if line.startswith("fedrun: error:")]
            assert bad.returncode == code and len(errors) == 1 and text in errors[0], bad.stderr[-2000:]
            assert "Traceback" not in bad.stderr
    assert trained.returncode == 0, trained.stderr[-3000:]
    res = run_cli(["audit", str(run_dir), "--samples", "6", "--levels", "0.3,0.5", "--draws", "1",
                   "--steps", "4", "--k", "5", "--max-members", "200"])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((run_dir / "audit.json").read_text())
    for key in ("auc", "tpr_at_1pct_fpr", "near_copies", "num_samples", "per_level", "per_client",
                "memorization"):
        assert key in result
    # the run kept an EMA: the audit looks at it, at the last round's checkpoint
    assert result["audited"] == "ema" and result["round"] == 2
    assert result["checkpoint"].endswith("round_0002.pt")
    assert result["num_samples"] == 6 and result["members"] == 200 and len(result["per_level"]) == 2
    assert 1 <= len(result["per_client"]) <= 4
    assert (run_dir / "audit_pairs.png").is_file()
    assert "membership AUC" in res.stdout and str(run_dir / "audit.json") in res.stdout

