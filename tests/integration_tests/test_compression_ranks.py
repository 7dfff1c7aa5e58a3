"""Compressed updates do not depend on the launch layout: each client's int8 message is drawn
from its (seed, round, client) stream, so after round 1 (every client trained from the same
initial model) every error-feedback residual is bit-identical on one process and on two torchrun
ranks, and so is the global model (the round's sum is exact, fedrun/flat.py); the bytes are the
same."""

from __future__ import annotations

import json

import pytest
import torch

from fedrun import checkpoint

from helpers import as_args, model_at, run_cli_together, same_bits, tiny_overrides


@pytest.mark.slow  # ~8 s: one process and two ranks
def test_error_feedback_residuals_one_process_vs_two_ranks(tmp_path):
    layout = dict(fed__num_clients=5, fed__clients_per_round=3, fed__rounds=1, fed__compress="int8")
    one, two = run_cli_together((as_args(tiny_overrides(tmp_path, "one", **layout)), 1),
                                (as_args(tiny_overrides(tmp_path, "two", **layout)), 2))
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    a, b = (checkpoint.load_verified(checkpoint.checkpoint_path(tmp_path / n, 1))["clients"]["clients"]
            for n in ("one", "two"))
    assert sorted(a) == sorted(b) and len(a) == 3  # round 1 trained 3 of 5
    for k in a:
        assert torch.equal(a[k]["ef_residual"], b[k]["ef_residual"]) and a[k]["ef_residual"].abs().max() > 0
    m1, m2 = model_at(tmp_path / "one", 1), model_at(tmp_path / "two", 1)
    assert same_bits(m1, m2)
    records = [json.loads((tmp_path / n / "metrics.jsonl").read_text()) for n in ("one", "two")]
    assert records[0]["bytes_up"] == records[1]["bytes_up"] == 3 * records[0]["bytes_up_per_client"]
