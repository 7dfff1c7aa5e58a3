"""Secure aggregation across real ranks: two torchrun ranks, each masking the clients it trains
under keys every rank derives from the round's broadcast secret, one all_reduce of the masked
buffer, every rank unmasking alike: the same model bits as the plain sum on one process, with 30 %
of the selected clients dropped after masking."""

from __future__ import annotations

import json

import pytest

from helpers import as_args, model_at, run_cli_together, same_bits, tiny_overrides

DROPOUTS = {"fed__num_clients": 10, "fed__clients_per_round": 10, "fed__availability": 0.7, "fed__rounds": 2}


@pytest.mark.slow  # ~15 s (.ci/run runs it); the quick suite masks across 2 gloo ranks in test_secure_agg.py
def test_two_ranks_unmask_the_plain_sum(tmp_path):
    masked = tiny_overrides(tmp_path, "masked", secure_agg__protocol="secagg+", **DROPOUTS)
    plain = tiny_overrides(tmp_path, "plain", **DROPOUTS)
    runs = run_cli_together((as_args(masked), 2), (as_args(plain), 1))
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert same_bits(model_at(tmp_path / "masked", 2), model_at(tmp_path / "plain", 2))
    records = [json.loads(line) for line in (tmp_path / "masked" / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records] == [2, 2]
    assert all(len(r["clients"]) < r["selected"] == 10 and "abandoned" not in r for r in records)
