"""The async study (benchmarks/async_study.py): its plan validates as fedrun would run it (sync
FedAvg with deadline and over-selection, FedBuff at K in {10, 20} and C in {50, 100}, 3 seeds,
equal client updates), and its report reads fake runs as worked out by hand: the time each
FedBuff row takes to reach synchronous FedAvg's final FID of the same seed, and its FID at equal
client updates."""

import json
import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import async_study  # noqa: E402


def test_the_dry_run_validates_every_run_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "runs"
    assert async_study.main(["--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "15 runs, 15 to do" in text and not out.exists()
    jobs = async_study.plan(out, {})
    rows = {(j.row, j.overrides.get("fed.buffer_size"), j.overrides.get("fed.concurrency")) for j in jobs}
    assert rows == {("sync", None, None), ("k10_c50", "10", "50"), ("k10_c100", "10", "100"),
                    ("k20_c50", "20", "50"), ("k20_c100", "20", "100")}
    for j in jobs:  # 30,000 client updates each, scored every 2,000
        per_step = 20 if j.row == "sync" else int(j.overrides["fed.buffer_size"])
        assert int(j.overrides["fed.rounds"]) * per_step == 30_000
        assert int(j.overrides["eval.every"]) * per_step == 2_000
    assert {j.seed for j in jobs} == {0, 1, 2}


def _fake_run(out, name, points):
    """A finished run whose metrics.jsonl scores (sim_clock_s, updates in the round, FID, acc)."""
    run = out / name
    run.mkdir(parents=True)
    lines = [{"round": r, "clients_trained": n, "sim_clock_s": t,
              **({"scores": {"fid_test": fid, "class_acc": acc}} if fid is not None else {})}
             for r, (t, n, fid, acc) in enumerate(points, start=1)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (run / "summary.json").write_text("{}")


def test_the_report_finds_the_time_to_syncs_final_fid_by_hand(tmp_path):
    out, results = tmp_path / "runs", tmp_path / "results"
    # sync: 3 rounds of 20 updates, 3,600 simulated s each; final FID 10 at 3 h and 60 updates
    _fake_run(out, "sync_s0", [(3600, 20, 30.0, 0.2), (7200, 20, None, None), (10800, 20, 10.0, 0.8)])
    # FedBuff K = 10: FID 9 (<= 10) first at 1.5 h with 40 updates; at 60 updates FID 8
    _fake_run(out, "k10_c50_s0", [(1800, 10, None, None), (2700, 10, 20.0, 0.5), (3600, 10, None, None),
                                  (5400, 10, 9.0, 0.85), (6300, 10, None, None), (7200, 10, 8.0, 0.9)])
    # another row never gets there: FID 12 at 60 updates
    _fake_run(out, "k20_c50_s0", [(1800, 20, 15.0, 0.5), (3600, 20, 13.0, 0.6), (5400, 20, 12.0, 0.7)])
    jobs = [j for j in async_study.plan(out, {}) if j.seed == 0]
    paths = async_study.write_results(jobs, out, results, "python benchmarks/async_study.py")
    data = json.loads(paths["json"].read_text())
    assert [(p["updates"], p["fid_test"]) for p in data["curves"]["sync"]["0"]] == [(20, 30.0), (60, 10.0)]
    fast = data["verdicts"]["k10_c50"]["per_seed"][0]
    assert fast["sim_h"] == 1.5 and fast["updates"] == 40 and fast["time_fraction"] == 0.5
    assert fast["fid_at_equal_updates"] == 8.0 and fast["fid_ratio_at_equal_updates"] == 0.8
    assert data["verdicts"]["k10_c50"]["half_the_time_on_every_seed"]
    slow = data["verdicts"]["k20_c50"]
    assert not slow["per_seed"][0]["reached"] and slow["per_seed"][0]["fid_ratio_at_equal_updates"] == 1.2
    assert not slow["half_the_time_on_every_seed"] and not slow["within_1.1x_fid_at_equal_updates"]
    md = paths["md"].read_text()
    assert "seed 0: 0.50 (1.50 h, 40 updates), FID ratio 0.80" in md and "seed 0: not reached" in md
    assert "Not finished: k10_c100_s0, k20_c100_s0." in md
    assert paths["png"].stat().st_size > 0 and str(tmp_path) not in md
