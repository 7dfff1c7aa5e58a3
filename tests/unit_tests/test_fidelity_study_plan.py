"""The fidelity study's plan (benchmarks/fidelity_study.py --dry-run), in-process: every table of
configs/digits_study/ is planned, and a run shared by several tables is trained once. The sweeps
themselves run as real processes in tests/integration_tests/test_sweeps.py."""

import sys

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import fidelity_study  # noqa: E402

STUDY = ROOT / "configs" / "digits_study"


def test_fidelity_study_plan_trains_shared_runs_once(capsys):
    assert fidelity_study.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    sweeps, trains = fidelity_study.plan_study(STUDY, [], None)
    tables = [spec["table"] for _, spec, _ in sweeps]
    assert tables == ["table1", "table2", "table3", "table4", "gap", "methods"]
    entries = sum(len(jobs) for _, _, jobs in sweeps)
    distinct = {id(j) for j in trains.values()}
    assert all(j.seed in (0, 1, 2) for _, _, jobs in sweeps for j in jobs)
    assert f"{entries} table entries, {len(distinct)} distinct runs" in out
    # FedAvg at the base budget is in tables I, II, III and the methods: trained once
    assert trains["table2_digits_alpha0.5_s1"] is trains["table1_digits_fedavg_s1"]
    fedavg = trains["table1_digits_fedavg_s1"]
    assert trains["table3_digits_n10_s1"] is trains["methods_digits_fedavg_s1"] is fedavg
    assert trains["table2_digits_alpha0.1_s1"].name == "table2_digits_alpha0.1_s1"
    t4 = {j.setting: j.config for _, spec, jobs in sweeps if spec["table"] == "table4" for j in jobs}
    base = t4["centralized"].fed
    for e in (1, 5, 10):  # fixed rounds (R = 4) as the paper, and the base's R x E in whole rounds
        assert (t4[f"e{e}"].fed.rounds, t4[f"e{e}"].fed.local_epochs) == (4, e)
        assert t4[f"e{e}_equal_epochs"].fed.rounds == max(1, round(base.rounds * base.local_epochs / e))
