"""The secure privacy study (benchmarks/secure_privacy_study.py): its plan is what the docs say
it compares, and every run's config validates as fedrun would load it (a renamed key or a
setting a mechanism refuses fails here, not hours into the study)."""

import sys

from fedrun.config import load_config

from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import secure_privacy_study as study  # noqa: E402


def test_every_planned_run_loads_and_the_rows_carry_their_mechanism(tmp_path, capsys):
    out = tmp_path / "runs"
    # once8 and client8_bits16_all on 3 seeds each, and the public models they start from
    assert study.main(["--dry-run", "--out", str(out), "--rows", "once8,client8_bits16_all"]) == 0
    assert "9 runs, 9 to do" in capsys.readouterr().out and not out.exists()
    jobs = study.plan(out, {})
    assert {j.row for j in jobs} == {row for row, _ in study.ROWS}
    # every seed: public, no DP, eps 1 and 8 x three mechanisms, eps 8 x three with LoRA, bits 12 / 20 / 0
    # and the five client-level rows; seeds 0 and 1 also eps 16 and 32 x three, local at 64 and the
    # recipe without noise
    assert len(jobs) == 3 * 19 + 2 * 8
    for j in jobs:
        cfg = load_config(j.config, {k: v for k, v in j.overrides.items() if k != "model.init_from"})
        if j.row.startswith("once"):
            assert cfg.privacy.level == "sample_once" and cfg.secure_agg.protocol == "secagg+"
        if j.row == "client8_bits16_all":
            assert cfg.secure_agg.min_survivors == cfg.fed.clients_per_round == 30
        if j.row == "client8_bits16_m20":
            assert cfg.secure_agg.min_survivors == 20 and cfg.secure_agg.bits == 16
        if j.row.endswith("_lora"):
            assert cfg.model.trainable == "lora" and cfg.privacy.target_epsilon == 8
        if j.row == "once_clip":  # the frontier's far end: next to no noise, no budget
            assert cfg.privacy.noise_multiplier == 0.05 and cfg.privacy.target_epsilon == 0
        if j.row == "client8_bits16_f09":
            assert cfg.secure_agg.survivor_fraction == 0.9 and cfg.secure_agg.bits == 16
        if j.after:  # every private row fine-tunes its own seed's public model
            assert j.overrides["model.init_from"] == str(out / f"public_s{j.seed}")


def test_the_frontier_and_the_ratio_to_centralized_against_hand_computed_values():
    def row(*cells):
        return [{"seed": s, "class_acc": acc, "fid_test": fid} for s, acc, fid in cells]

    rows = {
        "public": row((0, 0.70, 10.0), (1, 0.60, 20.0)),
        # eps 1: seed 1 misses both margins (+0.04, 0.955x); eps 8: both seeds beat both (+0.06, 0.94x)
        "once1": row((0, 0.80, 9.0), (1, 0.64, 19.1)),
        "once8": row((0, 0.76, 9.4), (1, 0.66, 18.8)),
        "central8": row((1, 0.70, 15.04)),
        "local32": row((0, 0.90, 10.0)),
    }
    assert study.first_beating(rows, "once") == 8
    assert study.first_beating(rows, "once", "fid_test") == 8
    assert study.first_beating(rows, "local") == 32  # only the seeds a row ran are asked
    assert study.first_beating(rows, "local", "fid_test") is None  # 1.0x the public model is no gain
    assert study.first_beating(rows, "central") == 8
    # only seed 1 ran both: 18.8 / 15.04 = 1.25
    assert [(s, round(x, 6)) for s, x in study.once_over_central(rows, 8)] == [(1, 1.25)]
    assert study.once_over_central(rows, 1) == []
    # against the public model of the same seed: 9.4 / 10 and 18.8 / 20; 0.76 - 0.70 and 0.66 - 0.60
    assert [round(x, 6) for x in study.relative_to_public(rows, "once8", "fid_test")] == [0.94, 0.94]
    assert [round(x, 6) for x in study.relative_to_public(rows, "once8", "class_acc")] == [0.06, 0.06]
