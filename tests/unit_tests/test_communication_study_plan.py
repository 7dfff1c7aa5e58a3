"""The communication study's plan (benchmarks/communication_study.py --dry-run), in-process:
every sweep of configs/communication_study/ validates at the default's budget, the uncompressed
run shared by both sweeps is trained once, and the goals are read against the uncompressed row."""

import json
import sys

from fedrun.config import Config

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import communication_study  # noqa: E402
import fidelity_study  # noqa: E402

STUDY = ROOT / "configs" / "communication_study"


def test_the_plan_covers_every_compressor_at_the_defaults_budget(capsys):
    assert communication_study.main(["--dry-run"]) == 0
    assert "24 table entries, 22 distinct runs" in capsys.readouterr().out
    sweeps, trains = fidelity_study.plan_study(STUDY, [], None)
    assert [spec["table"] for _, spec, _ in sweeps] == ["compressors", "topk"]
    assert trains["topk_digits_none_s1"] is trains["compressors_digits_none_s1"]
    fed = [j.config.fed for j in trains.values()]
    methods = {(f.compress, f.compress_density if f.compress == "topk" else None, f.error_feedback)
               for f in fed}
    for density in (0.1, 0.01, 0.001):
        assert ("topk", density, True) in methods and ("topk", density, False) in methods
    assert {m[0] for m in methods} == {"none", "bf16", "int8", "topk", "sign"}
    for job in trains.values():  # the default's budget and method, 2 seeds
        f = job.config.fed
        assert (f.rounds, f.local_epochs, f.num_clients, job.config.diffusion.guidance) == (100, 1, 10, 1.0)
        assert job.seed in (0, 1)


def _run(root, name: str, compress: str, fid: float, fewer: float):
    cfg = Config()
    cfg.fed.compress = compress
    run = root / name
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"config": cfg.to_dict()}))
    return {"setting": name, "runs": [str(run)],
            "scores": {"fid_test": {"mean": fid}, "uplink_reduction": {"mean": fewer},
                       "bytes_up_per_round": {"mean": 4e7 / fewer}, "class_acc": {"mean": 0.9}}}


def test_the_goals_are_read_against_the_uncompressed_row(tmp_path):
    rows = [_run(tmp_path, "none", "none", 2.0, 1.0), _run(tmp_path, "int8", "int8", 2.08, 3.99),
            _run(tmp_path, "bf16", "bf16", 2.5, 2.0)]
    lines = communication_study.goals_section({"tables": {"compressors": {"rows": rows}}})
    int8 = next(line for line in lines if "| int8 |" in line)
    assert "| 3.99 | 10 | 1.04 | 0.900 | >= 3.9x at <= 1.05x | yes |" in int8
    bf16 = next(line for line in lines if "| bf16 |" in line)
    assert "| 1.25 |" in bf16 and bf16.endswith("|  |  |")  # no goal for bf16
    rows[1]["scores"]["fid_test"]["mean"] = 2.2  # 1.10x the FID: the goal is missed
    lines = communication_study.goals_section({"tables": {"compressors": {"rows": rows}}})
    assert next(line for line in lines if "| int8 |" in line).endswith("| no |")
