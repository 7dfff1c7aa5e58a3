"""``fedrun report``: labels from varying settings, the paper layout, md/csv/png outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from PIL import Image

from fedrun.__main__ import main as fedrun_main
from fedrun.config import Config
from fedrun.errors import RunDirError
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
    assert rows[0] == ["setting", "digits IS", "digits IS std", "digits FID (train)", "digits FID (test)",
                       "digits class acc"]
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
    # digits: IS, FIDs, class acc, FID / centralized; synthetic (no centralized scores): dashes
    assert "| run.mode=centralized | 7.00 ± 0.25 | 20.00 | 22.00 | 0.900 | 1.00 | – | – | – | – | – |" in md
    assert "| run.mode=fedavg | 6.00 ± 0.25 | 10.00 | 11.00 | 0.900 | 0.50 | 8.00 ± 0.25 |" in md


def test_identical_settings_are_told_apart_by_folder(tmp_path):
    dirs = [_run(tmp_path, n, _scores(1)) for n in ("x", "y")]
    table = report.build_table([report.load_run(d) for d in dirs])
    assert sorted(table.labels) == ["run.mode=fedavg (x)", "run.mode=fedavg (y)"]


def test_missing_summary_is_one_error_line_with_the_run_dir_exit_code(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(report.ReportError, match="unfinished.*summary.json"):
        report.main([str(tmp_path / "unfinished")])
    # through the command line: fedrun.__main__ prints any FedrunError as one line
    assert fedrun_main(["report", str(tmp_path / "unfinished")]) == RunDirError.exit_code == 4
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1 and "summary.json" in errors[0] and "unfinished" in errors[0]
    assert issubclass(report.ReportError, RunDirError)
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


def _fid(fid_test: float, is_mean: float = 5.0, **more) -> dict:
    return {"is_mean": is_mean, "is_std": 0.1, "fid_train": fid_test + 1.0, "fid_test": fid_test,
            "extractor": "classifier", **more}


def test_seeds_of_one_setting_form_one_row_with_mean_and_sample_std(tmp_path):
    dirs = [_run(tmp_path, f"a01_s{s}", _fid(f, i, class_acc=acc), fed__alpha=0.1, run__seed=s)
            for s, f, i, acc in ((0, 10.0, 5.0, 0.5), (1, 12.0, 6.0, 0.6), (2, 17.0, 8.0, 0.9))]
    dirs.append(_run(tmp_path, "a05_s0", _fid(20.0, 7.0), fed__alpha=0.5))  # one seed, no class_acc
    table, paths = report.make_report(dirs)
    assert table.labels == ["fed.alpha=0.1", "fed.alpha=0.5"]  # run.seed is never a label
    mean, std, n = table.stats("fed.alpha=0.1", "digits", "fid_test")
    # by hand: mean 13, deviations -3, -1, 4: sample variance 26 / 2 = 13
    assert (mean, n) == (13.0, 3) and std == pytest.approx(13 ** 0.5)
    md = paths["md"].read_text()
    # IS 5, 6, 8: mean 19/3, variance (16 + 1 + 25) / 9 / 2 = 7/3; class acc 0.5, 0.6, 0.9: std 0.2082
    assert ("| fed.alpha=0.1 | 6.33 ± 1.53 (n=3) | 14.00 ± 3.61 (n=3) | 13.00 ± 3.61 (n=3) "
            "| 0.667 ± 0.208 (n=3) |") in md
    assert "| fed.alpha=0.5 | 7.00 ± 0.10 | 21.00 | 20.00 | – |" in md  # a single seed: as before
    assert "a01_s0" in md and "a01_s2" in md and "(a01_s" not in md  # no folder labels
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    one = next(r for r in rows if r["setting"] == "fed.alpha=0.1")
    assert float(one["digits FID (test)"]) == 13.0
    assert float(one["digits FID (test) std over seeds"]) == pytest.approx(13 ** 0.5)
    assert one["digits seeds"] == "3" and next(r for r in rows if r["setting"] == "fed.alpha=0.5")[
        "digits FID (test) std over seeds"] == ""


def test_same_seed_twice_is_told_apart_by_folder_not_averaged(tmp_path):
    dirs = [_run(tmp_path, n, _fid(f), fed__alpha=0.1) for n, f in (("x", 1.0), ("y", 3.0))]
    dirs.append(_run(tmp_path, "z", _fid(5.0), fed__alpha=0.5))
    table = report.build_table([report.load_run(d) for d in dirs])
    assert table.labels == ["fed.alpha=0.1 (x)", "fed.alpha=0.1 (y)", "fed.alpha=0.5"]
    assert table.score("fed.alpha=0.1 (y)", "digits", "fid_test") == 3.0


def test_fid_ratio_to_the_centralized_row_of_the_same_budget(tmp_path):
    cen = dict(run__mode="centralized", fed__rounds=10, fed__local_epochs=2)
    dirs = [_run(tmp_path, "c0", _fid(4.0), **cen, run__seed=0),
            _run(tmp_path, "c1", _fid(6.0), **cen, run__seed=1),
            _run(tmp_path, "ce", _fid(2.0), **cen, ema__sigma_rel=0.1),
            _run(tmp_path, "f0", _fid(10.0), fed__rounds=10, fed__local_epochs=2, run__seed=0),
            _run(tmp_path, "f1", _fid(12.0), fed__rounds=10, fed__local_epochs=2, run__seed=1),
            _run(tmp_path, "fe", _fid(3.0), fed__rounds=10, fed__local_epochs=2, ema__sigma_rel=0.1),
            _run(tmp_path, "eq", _fid(15.0), fed__rounds=20, fed__local_epochs=1),  # 20 epochs too
            _run(tmp_path, "e5", _fid(30.0), fed__rounds=10, fed__local_epochs=5)]  # 50 epochs
    table, paths = report.make_report(dirs)
    fed = "fed.rounds=10, fed.local_epochs=2"
    assert table.labels[:2] == ["run.mode=centralized, fed.rounds=10, fed.local_epochs=2",
                                "run.mode=centralized, fed.rounds=10, fed.local_epochs=2, ema.sigma_rel=0.1"]
    assert table.ratio(fed, "digits") == pytest.approx(11.0 / 5.0)  # means over seeds
    assert table.ratio(f"{fed}, ema.sigma_rel=0.1", "digits") == pytest.approx(3.0 / 2.0)  # EMA vs EMA
    assert table.ratio("fed.rounds=20, fed.local_epochs=1", "digits") == pytest.approx(15.0 / 5.0)
    assert table.ratio("fed.rounds=10, fed.local_epochs=5", "digits") is None  # no centralized at 50
    assert table.ratio(table.labels[0], "digits") == 1.0
    md = paths["md"].read_text()
    assert "digits FID / centralized |" in md
    assert f"| {fed} | 5.00 ± 0.00 (n=2) | 12.00 ± 1.41 (n=2) | 11.00 ± 1.41 (n=2) | 2.20 |" in md
    assert "| fed.rounds=10, fed.local_epochs=5 | 5.00 ± 0.10 | 31.00 | 30.00 | – |" in md


def test_no_centralized_run_no_ratio_column(tmp_path):
    dirs = [_run(tmp_path, n, _fid(f), fed__alpha=a) for n, f, a in (("a", 1.0, 0.1), ("b", 2.0, 5.0))]
    table, paths = report.make_report(dirs)
    assert "FID / centralized" not in paths["md"].read_text() and table.reference == {}


def test_epsilon_and_audit_columns(tmp_path):
    dp = _run(tmp_path, "dp", _fid(8.0), privacy__level="client", privacy__noise_multiplier=1.1)
    summary = json.loads((dp / "summary.json").read_text())
    summary["privacy"] = {"epsilon_max": 3.456, "delta": 1e-5}
    (dp / "summary.json").write_text(json.dumps(summary))
    (dp / "audit.json").write_text(json.dumps({"auc": 0.5123, "near_copies": 2, "other": 1}))
    plain = _run(tmp_path, "plain", _fid(6.0))
    (plain / "audit.json").write_text(json.dumps({"auc": 0.75, "near_copies": [3, 9, 11]}))  # a list: 3
    table, paths = report.make_report([plain, dp])
    md = paths["md"].read_text()
    assert "| digits epsilon | digits audit AUC | digits near copies |" in md
    # noise_multiplier only labels the run that has privacy on
    assert "| privacy.level=client, privacy.noise_multiplier=1.1 | 5.00 ± 0.10 | 9.00 | 8.00 | 3.46 " \
           "| 0.512 | 2 |" in md
    assert "| default | 5.00 ± 0.10 | 7.00 | 6.00 | – | 0.750 | 3 |" in md  # privacy off: not named
    (plain / "audit.json").write_text("{not json")
    with pytest.raises(report.ReportError, match="audit.json"):
        report.load_run(plain)


def test_method_labels_name_what_is_on(tmp_path):
    dirs = [_run(tmp_path, "fedavg", _fid(9.0)),
            _run(tmp_path, "prox", _fid(8.0), fed__drift="fedprox", fed__prox_mu=0.1),
            _run(tmp_path, "scaf", _fid(7.0), fed__drift="scaffold", fed__prox_mu=0.1),
            _run(tmp_path, "ema", _fid(6.0), ema__sigma_rel=0.1),
            _run(tmp_path, "cos", _fid(5.0), optim__lr_schedule="cosine", optim__min_lr_ratio=0.05),
            _run(tmp_path, "adam", _fid(4.0), fed__server_opt="fedadam", fed__server_lr=0.01),
            _run(tmp_path, "cfg", _fid(3.0), model__label_dropout=0.1, diffusion__guidance=1.0),
            _run(tmp_path, "keep", _fid(2.0), fed__client_optimizer="keep")]
    table = report.build_table([report.load_run(d) for d in dirs])
    labels = {r.path.name: r.label for rs in table.cells.values() for r in rs}
    assert labels == {
        "fedavg": "default", "prox": "fed.drift=fedprox, fed.prox_mu=0.1",
        "scaf": "fed.drift=scaffold",  # prox_mu does not apply to SCAFFOLD
        "ema": "ema.sigma_rel=0.1", "cos": "optim.lr_schedule=cosine, optim.min_lr_ratio=0.05",
        "adam": "fed.server_opt=fedadam, fed.server_lr=0.01",
        "cfg": "model.label_dropout=0.1, diffusion.guidance=1.0", "keep": "fed.client_optimizer=keep"}


def test_png_draws_std_whiskers(tmp_path):
    dirs = [_run(tmp_path, f"s{s}", _fid(f), run__seed=s) for s, f in ((0, 10.0), (1, 30.0))]
    table, paths = report.make_report(dirs)
    fig = report.bar_figure(table)
    axes = {ax.get_title(): ax for ax in fig.axes}
    assert list(axes) == ["digits: IS ↑", "digits: FID (train) ↓", "digits: FID (test) ↓"]
    fid = axes["digits: FID (test) ↓"]
    (bar,) = [c for c in fid.containers if isinstance(c, BarContainer)]
    assert [p.get_width() for p in bar.patches] == [20.0]  # the mean over the two seeds
    (whisker,) = [c for c in fid.containers if isinstance(c, ErrorbarContainer)]
    (segment,) = whisker.lines[2][0].get_segments()  # from mean - std to mean + std
    assert segment[:, 0] == pytest.approx([20.0 - 200 ** 0.5, 20.0 + 200 ** 0.5])
    assert "20.00 ± 14.14" in [t.get_text() for t in fid.texts]  # the value label
    is_ = axes["digits: IS ↑"]  # the settings are named once per row, left of the first panel
    assert [t.get_text() for t in is_.get_yticklabels()] == ["run.mode=fedavg  (n=2)"]
    assert fid.get_xticks().size > 2  # an axis with ticks
    with Image.open(paths["png"]) as im:
        assert im.size[0] > 600 and im.size[1] > 150


def test_heat_map_has_a_colour_bar_class_ticks_and_the_global_row(tmp_path):
    scores = {**_fid(6.0), "per_class": {"fid_test": [5.0, 7.0, 9.0], "kid_test": [0.0] * 3}}
    run = _run(tmp_path, "a", scores)
    summary = json.loads((run / "summary.json").read_text())
    summary["client_scores"] = {"3": [{"client": 4, "per_class_fid_test": [40.0, None, 2.0]}]}
    (run / "summary.json").write_text(json.dumps(summary))
    fig = report.heatmap_figure([report.load_run(run)])
    heat, bar = fig.axes  # the map and its colour bar
    assert [t.get_text() for t in heat.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["client 4", "global model"]
    assert "round 3" in heat.get_title() and "–" in [t.get_text() for t in heat.texts]  # no score
    assert bar.get_ylim() == (2.0, 40.0)  # the colour scale spans the panel's scores
    assert report.heatmap_figure([report.load_run(_run(tmp_path, "b", _fid(1.0)))]) is None


def _metrics(run_dir: Path, records: list[dict]) -> None:
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_of_each_run_from_its_metrics(tmp_path):
    fed = _run(tmp_path / "runs", "fed", _fid(5.0), fed__alpha=0.1)
    _metrics(fed, [{"round": r, "loss": 1.0 / r, "wait_s": 0.1 * r, "allreduce_bytes": 4000,
                    "epsilon": 0.5 * r, **({"scores": _fid(9.0, class_acc=0.4)} if r == 2 else {})}
                   for r in (1, 2, 3)])
    with (fed / "metrics.jsonl").open("a") as f:
        f.write('{"round": 4, "lo')  # torn by kill -9: skipped
    central = _run(tmp_path / "runs", "central", _fid(4.0), run__mode="centralized", fed__local_epochs=3)
    _metrics(central, [{"round": r, "epochs": 3 * r, "loss": 0.5 / r} for r in (1, 2)])
    bare = _run(tmp_path / "runs", "bare", _fid(6.0), fed__alpha=0.5)  # no metrics.jsonl: no curves
    out = tmp_path / "out"
    table, paths = report.make_report([fed, central, bare], out)
    assert paths["curves:fed"] == out / "fed_curves.png" and paths["curves:central"].is_file()
    assert "curves:bare" not in paths and not (out / "bare_curves.png").exists()

    fig = report.curves_figure(report.load_run(fed), report.load_metrics(fed))
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["training loss", "FID ↓ (evaluated rounds)", "class accuracy ↑ (evaluated rounds)",
                      "privacy spent", "bytes per round", "wait for the slowest rank"]
    loss = fig.axes[0].lines[0]
    assert list(loss.get_xdata()) == [1, 2, 3] and list(loss.get_ydata()) == [1.0, 0.5, 1.0 / 3]
    fid_lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                 for line in fig.axes[1].lines}
    assert fid_lines == {"test": ([2], [9.0]), "train": ([2], [10.0])}
    assert list(fig.axes[4].lines[0].get_ydata()) == [0.004] * 3  # MB

    fig = report.curves_figure(report.load_run(central), report.load_metrics(central))
    (panel,) = [ax for ax in fig.axes if ax.get_visible()]  # the loss only: no other numbers
    assert panel.get_title() == "training loss" and panel.get_xlabel() == "round (3 epochs each)"
    assert report.main([str(fed), "--out", str(tmp_path / "quiet"), "--no-curves"]) == 0
    assert not list((tmp_path / "quiet").glob("*_curves.png"))


def test_feddyn_is_labelled_with_its_alpha_only_when_it_is_on(tmp_path):
    dirs = [_run(tmp_path, "plain", _fid(9.0), fed__feddyn_alpha=0.5),  # alpha of a method that is off
            _run(tmp_path, "dyn", _fid(8.0), fed__drift="feddyn", fed__feddyn_alpha=0.1),
            _run(tmp_path, "central", _fid(7.0), run__mode="centralized", fed__feddyn_alpha=0.1)]
    table = report.build_table([report.load_run(d) for d in dirs])
    labels = {r.path.name: r.label for rs in table.cells.values() for r in rs}
    assert labels == {"plain": "run.mode=fedavg", "dyn": "fed.drift=feddyn, fed.feddyn_alpha=0.1",
                      "central": "run.mode=centralized"}


def test_labels_read_the_config_fields_facts():
    from fedrun.config import FEDERATED, key_facts, unless
    from fedrun.evaluation.report.table import applies, is_label, is_off

    assert not is_label("run.seed") and not is_label("checkpoint.every") and not is_label("data.name")
    assert not is_label("run.tensorboard") and is_label("eval.steps") and is_label("fed.alpha")
    assert key_facts("fed.alpha").applies == FEDERATED & unless("fed.partition", "iid")
    assert not applies("fed.alpha", {"fed.partition": "iid"}) and applies("fed.alpha", {})
    assert applies("fed.rounds", {"run.mode": "centralized"})
    assert not applies("fed.num_clients", {"run.mode": "centralized"})
    assert not applies("privacy.clip", {}) and applies("privacy.clip", {"privacy.level": "sample"})
    assert is_off("fed.drift", "none") and not is_off("fed.drift", "feddyn") and not is_off("fed.alpha", 0.5)
    assert is_label("some.key_of_an_older_release") and applies("some.key_of_an_older_release", {})


# --------------------------------------------------------------------------------------------
# Intervals: seeds' spread and sampling intervals; "not resolved"


def _fid_ci(fid: float, half: float) -> dict:
    return _fid(fid, fid_test_ci=[fid - half, fid + half], bootstrap={"resamples": 200, "confidence": 0.95})


def test_seeds_interval_takes_the_larger_of_the_spread_and_the_sampling_noise():
    from scipy import stats

    from fedrun.evaluation.report.table import seeds_interval
    z = stats.norm.ppf(0.975)
    # spread larger: S^2 = 1 (values 1, 2, 3), sampling v = (0.1 / z)^2: t with 2 df on sqrt(1 / 3)
    got = seeds_interval([1.0, 2.0, 3.0], [(v - 0.1, v + 0.1) for v in (1.0, 2.0, 3.0)])
    half = stats.t.ppf(0.975, 2) * (1 / 3) ** 0.5
    assert (got.mean, got.lo, got.hi, got.df) == pytest.approx((2.0, 2 - half, 2 + half, 2))
    # sampling larger: three equal scores whose own intervals are wide: normal quantile, v / k
    got = seeds_interval([2.0, 2.0, 2.0], [(1.0, 3.0)] * 3)
    assert got.df is None and got.hi - got.mean == pytest.approx(z * ((1 / z) ** 2 / 3) ** 0.5)
    assert seeds_interval([2.0], [(1.5, 2.7)]).lo == 1.5  # one run: its own interval


def test_ratio_interval_on_the_log_scale():
    from fedrun.evaluation.report.table import Interval, ratio_interval, resolution
    a = Interval(2.0, 0, 0, sd=0.2, df=None, confidence=0.95)
    b = Interval(1.0, 0, 0, sd=0.1, df=None, confidence=0.95)
    r = ratio_interval(a, b)
    half = 1.959964 * (0.1 ** 2 + 0.1 ** 2) ** 0.5
    assert (r.mean, r.lo, r.hi) == pytest.approx((2.0, 2 * 2.718281828 ** -half, 2 * 2.718281828 ** half))
    assert resolution(r) == "resolved"
    assert resolution(ratio_interval(Interval(1.1, 0, 0, 0.3, 2.0, 0.95), b)) == "not resolved"


def test_report_prints_intervals_and_says_not_resolved(tmp_path):
    fed = [_run(tmp_path, f"fed_s{s}", _fid_ci(f, 0.3), run__seed=s)
           for s, f in ((0, 1.8), (1, 2.0), (2, 2.2))]
    cen = [_run(tmp_path, f"cen_s{s}", _fid_ci(f, 0.3), run__seed=s, run__mode="centralized")
           for s, f in ((0, 1.6), (1, 1.7), (2, 1.8))]
    far = [_run(tmp_path, f"far_s{s}", _fid_ci(f, 0.1), run__seed=s, fed__alpha=0.1)
           for s, f in ((0, 6.0), (1, 6.1), (2, 6.2))]
    table, paths = report.make_report(fed + cen + far, curves=False)
    md = paths["md"].read_text()
    ratio = table.ratio_interval("fed.alpha=0.5", "digits")  # FedAvg at the default alpha: 1.18x
    assert ratio is not None and ratio.lo < 1 < ratio.hi
    assert f"| 1.18 [{ratio.lo:.2f}, {ratio.hi:.2f}] not resolved |" in md
    assert f"fed.alpha=0.5 vs run.mode=centralized (digits): FID (test) ratio 1.18 [{ratio.lo:.2f}, " in md
    assert md.count(": not resolved at 95%.") == 1 and md.count(": resolved at 95%.") == 1  # alpha 0.1: 3.6x
    ci = table.interval("fed.alpha=0.5", "digits", "fid_test")
    # spread (S = 0.2) above the sampling noise (0.3 / 1.96): t with 2 degrees of freedom
    assert ci.df == 2 and (ci.hi - ci.mean) == pytest.approx(4.302653 * 0.2 / 3 ** 0.5)
    assert f"2.00 ± 0.20 [{ci.lo:.2f}, {ci.hi:.2f}] (n=3)" in md


def test_a_fedbuff_run_gets_its_staleness_histogram(tmp_path):
    """FedBuff's records carry each used update's staleness: the report draws their histogram
    over the run (a bar per staleness, its height the updates that stale), a synchronous run none."""
    fed = _run(tmp_path / "runs", "fedbuff", _fid(5.0), fed__participation="fedbuff")
    _metrics(fed, [{"round": 1, "loss": 1.0, "staleness": [0, 0, 1], "wasted_total": 0},
                   {"round": 2, "loss": 0.9, "staleness": [2, 0, 3], "wasted_total": 4}])
    sync = _run(tmp_path / "runs", "sync", _fid(6.0))
    _metrics(sync, [{"round": 1, "loss": 1.0}])
    table, paths = report.make_report([fed, sync], tmp_path / "out")
    assert paths["staleness:fedbuff"].is_file() and "staleness:sync" not in paths
    fig = report.staleness_figure(report.load_run(fed), report.load_metrics(fed))
    (bars,) = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert [b.get_height() for b in bars] == [3, 1, 1, 1]  # staleness 0, 1, 2, 3
    assert "6 updates used, 4 wasted" in fig.axes[0].get_title()
    assert report.staleness_figure(report.load_run(sync), report.load_metrics(sync)) is None
