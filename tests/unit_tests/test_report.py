"""``fedrun report``: labels from varying settings, the paper layout, md/csv/png outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from fedrun.config import Config
from fedrun.evaluation import report


def _run(root: Path, name: str, scores: dict | None = None, **settings) -> Path:
    """A finished run dir: summary.json with a full resolved config, as train writes it."""
    cfg = Config()
    cfg.run.name = name
    cfg.data.name, cfg.data.image_size, cfg.data.channels = "digits", 16, 1
    for key, value in settings.items():
        section, attr = key.split("__")
        setattr(getattr(cfg, section), attr, value)
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"config": cfg.to_dict(), "scores": scores or {}}))
    return run_dir


def _scores(i: float) -> dict:
    return {"is_mean": 5.0 + i, "is_std": 0.25, "fid_train": 10.0 * i, "fid_test": 11.0 * i,
            "extractor": "classifier", "num_samples": 360, "class_acc": 0.9}


def test_two_runs_labelled_by_the_setting_that_varies(tmp_path, capsys):
    a = _run(tmp_path / "runs", "a", _scores(1), fed__alpha=0.1)
    b = _run(tmp_path / "runs", "b", _scores(2), fed__alpha=0.5)
    out = tmp_path / "out"
    assert report.main([str(b), str(a), "--out", str(out)]) == 0

    md = (out / "report.md").read_text()
    assert "| setting | digits IS | digits FID (train) | digits FID (test) |" in md
    assert "| fed.alpha=0.1 | 6.00 ± 0.25 | 10.00 | 11.00 |" in md
    assert "| fed.alpha=0.5 | 7.00 ± 0.25 | 20.00 | 22.00 |" in md
    assert md.index("fed.alpha=0.1 |") < md.index("fed.alpha=0.5 |")  # sorted, not argv order
    assert "run.name" not in md and "proxy classifier" in md

    rows = list(csv.reader((out / "report.csv").open()))
    assert rows[0] == ["setting", "digits IS", "digits IS std", "digits FID (train)", "digits FID (test)"]
    assert rows[1][0] == "fed.alpha=0.1" and float(rows[1][1]) == 6.0 and float(rows[2][4]) == 22.0

    with Image.open(out / "report.png") as im:
        assert im.size[0] > 300 and im.size[1] > 200
    printed = capsys.readouterr().out
    assert "fed.alpha=0.1" in printed and "7.00 ± 0.25" in printed


def test_centralized_run_is_not_labelled_with_federated_settings(tmp_path):
    runs = [_run(tmp_path, "central", _scores(1), run__mode="centralized"),
            _run(tmp_path, "fed01", _scores(2), fed__alpha=0.1),
            _run(tmp_path, "fed05", _scores(3), fed__alpha=0.5)]
    table = report.build_table([report.load_run(r) for r in runs])
    assert table.labels == ["run.mode=centralized", "fed.alpha=0.1", "fed.alpha=0.5"]


def test_runs_of_two_data_sets_share_rows_and_missing_scores_show_a_dash(tmp_path):
    dirs = [_run(tmp_path, f"{ds}_{mode}", None if (ds, mode) == ("synthetic", "centralized") else _scores(i),
                 run__mode=mode, data__name=ds, data__channels=3 if ds == "synthetic" else 1)
            for i, (ds, mode) in enumerate([(d, m) for d in ("digits", "synthetic")
                                            for m in ("fedavg", "centralized")], 1)]
    table, paths = report.make_report(dirs)
    assert paths["md"].parent == tmp_path  # default: next to the runs
    assert table.datasets == ["digits", "synthetic"]
    assert table.labels == ["run.mode=centralized", "run.mode=fedavg"]  # data.channels is no label
    md = paths["md"].read_text()
    assert "| run.mode=centralized | 7.00 ± 0.25 | 20.00 | 22.00 | – | – | – |" in md


def test_identical_settings_are_told_apart_by_folder(tmp_path):
    dirs = [_run(tmp_path, n, _scores(1)) for n in ("x", "y")]
    table = report.build_table([report.load_run(d) for d in dirs])
    assert sorted(table.labels) == ["run.mode=fedavg (x)", "run.mode=fedavg (y)"]


def test_missing_summary_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    assert report.main([str(tmp_path / "unfinished")]) == 2
    err = capsys.readouterr().err
    assert "summary.json" in err and "unfinished" in err
    with pytest.raises(report.ReportError, match="config"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "summary.json").write_text("{}")
        report.load_run(tmp_path / "bad")


def test_a_data_setting_varied_within_one_data_set_is_a_label(tmp_path):
    dirs = [_run(tmp_path, n, _scores(1), data__hflip=flip) for n, flip in (("f", False), ("t", True))]
    table = report.build_table([report.load_run(d) for d in dirs])
    assert table.labels == ["data.hflip=false", "data.hflip=true"]


def test_new_scores_per_client_table_and_heat_map(tmp_path, capsys):
    scores = {**_scores(1), "kid_test": 0.0123, "precision": 0.8, "recall": 0.6, "density": 0.9,
              "coverage": 0.7, "is_extractor": "classifier", "extractor": "inception",
              "per_class": {"fid_test": [5.0, 7.0, 9.0], "kid_test": [0.001, 0.002, 0.003],
                            "count": [3, 3, 3]},
              "clients": [{"client": 0, "images": 50, "fid_own": 4.0, "kid_own": 0.004},
                          {"client": 1, "images": 20, "fid_own": 6.0, "kid_own": 0.006}]}
    run = _run(tmp_path / "runs", "a", scores)
    summary = json.loads((run / "summary.json").read_text())
    summary["client_scores"] = {"2": [
        {"client": 1, "images": 20, "fid_own": 3.0, "kid_own": 0.003, "fid_test": 30.0, "kid_test": 0.03,
         "per_class_fid_test": [40.0, 2.0, None], "per_class_kid_test": [0.04, 0.002, None]}]}
    (run / "summary.json").write_text(json.dumps(summary))
    out = tmp_path / "out"
    assert report.main([str(run), "--out", str(out)]) == 0

    md = (out / "report.md").read_text()
    assert "digits KID x1e3 (test) | digits precision | digits recall" in md
    assert "| 12.30 | 0.800 | 0.600 | 0.900 | 0.700 |" in md
    assert "inception (IS: classifier)" in md
    assert "| 1 | 20 | 3.00 | 30.00 | 6.00 | 3.00 | 30.00 | 6.00 |" in md  # local own/test, global own
    assert "| 0 | 50 | – | – | 4.00 |" in md  # not sampled in that round: global only
    assert "| FID | 5.00 | 7.00 | 9.00 |" in md
    rows = list(csv.reader((out / "report_clients.csv").open()))
    assert rows[0][:5] == ["run", "setting", "data set", "round", "client"] and len(rows) == 3
    assert rows[2][4] == "1" and float(rows[2][-3]) == 40.0 and rows[2][-1] == ""
    with Image.open(out / "report_clients.png") as im:
        assert im.size[0] > 150 and im.size[1] > 100
    assert "report_clients.png" in capsys.readouterr().out
