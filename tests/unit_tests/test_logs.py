"""What a cluster user reads: a job's log (not a terminal) carries every figure of the tables in
full."""

from __future__ import annotations

import io

from rich.console import Console

from fedrun.evaluation.evaluator import scores_table
from fedrun.logs import LOG_WIDTH, log_console

ROW = {"round": 100, "is_mean": 6.6912, "is_std": 0.1234, "fid_train": 16.345678, "fid_test": 1.7612,
       "kid_test": 0.000123, "precision": 0.8123, "recall": 0.7456, "density": 1.0234,
       "coverage": 0.9345, "num_samples": 360, "extractor": "classifier", "is_extractor": "classifier"}


def test_a_log_file_gets_the_whole_scores_table():
    console = log_console()  # not a terminal under pytest: the wide layout
    assert not console.is_terminal and console.width == LOG_WIDTH
    out = io.StringIO()
    Console(file=out, width=console.width).print(scores_table([ROW]))
    text = out.getvalue()
    assert "…" not in text
    for figure in ("16.35", "1.76", "0.812", "0.746", "1.023", "0.934", "classifier", "0.12"):
        assert figure in text, figure
    narrow = io.StringIO()
    Console(file=narrow, width=80).print(scores_table([ROW]))  # what rich does by itself
    assert "…" in narrow.getvalue()  # the cut that the wide layout avoids
