"""A resumed run ends with the same model as an uninterrupted one (bit for bit), whatever state
it carries across the restart: the RNG, a server optimizer's moments, the centralized Adam, the
EMA, and what clients keep between rounds (Adam moments, SCAFFOLD control variates, FedDyn's
gradient state and its server correction, compression's error-feedback residuals), a LoRA
run's adapters on top of its frozen base, secure aggregation with distributed noise (keys
drawn afresh every round, noise shares from their seeded streams), and FedBuff's past model
versions that clients still training from them need."""

import json

import pytest
import torch

from fedrun import checkpoint
from fedrun.adapters import count_trainable, make_trainable
from fedrun.config import load_config
from fedrun.init_from import state_sha256
from fedrun.models import build, count_parameters
from fedrun.privacy.accountant import epsilon_of, sample_level_step
from fedrun.train import train

from helpers import model_at, same_bits, tiny_overrides


def final_checkpoint(cfg):
    return checkpoint.load_verified(checkpoint.checkpoint_path(cfg.run_dir, cfg.fed.rounds))


@pytest.mark.parametrize("extra", [
    pytest.param({"run__mode": "fedavg"}, id="fedavg"),
    pytest.param({"run__mode": "fedavg", "fed__server_opt": "fedadam", "fed__server_lr": "0.01"},
                 id="fedadam-server-state"),
    pytest.param({"run__mode": "centralized"}, id="centralized-adam-state", marks=pytest.mark.slow),
    pytest.param({"run__mode": "fedavg", "ema__sigma_rel": "0.1", "fed__drift": "scaffold",
                  "fed__client_optimizer": "keep", "model__label_dropout": "0.2"},
                 id="ema-scaffold-kept-adam-client-state"),
    pytest.param({"run__mode": "fedavg", "fed__drift": "feddyn", "fed__feddyn_alpha": "0.1"},
                 id="feddyn-client-and-server-state"),
    pytest.param({"run__mode": "centralized", "ema__sigma_rel": "0.1"}, id="centralized-ema",
                 marks=pytest.mark.slow),
    pytest.param({"run__mode": "fedavg", "privacy__level": "sample", "fed__num_clients": "12"},
                 id="dp-sgd-ledger", marks=pytest.mark.slow),
    pytest.param({"run__mode": "fedavg", "privacy__level": "client", "privacy__clip": "0.01",
                  "fed__num_clients": "12"}, id="dp-fedavg-ledger-and-poisson-clients"),
    pytest.param({"run__mode": "fedavg", "model__trainable": "lora", "model__lora_rank": "2",
                  "ema__sigma_rel": "0.1", "privacy__level": "sample", "privacy__multiplicity": "2",
                  "fed__num_clients": "24", "optim__batch_size": "16"},
                 id="lora-adapters-dp-sgd-multiplicity-ema", marks=pytest.mark.slow),
    pytest.param({"run__mode": "fedavg", "fed__compress": "int8"}, id="int8-error-feedback-residuals"),
    # FedBuff stopped mid-stream: clients still training from versions before the checkpoint's
    pytest.param({"run__mode": "fedavg", "fed__participation": "fedbuff", "fed__concurrency": "3",
                  "fed__buffer_size": "2", "fed__speed_sigma": "0.5", "fed__server_opt": "fedadam",
                  "fed__server_lr": "0.01", "fed__compress": "int8"}, id="fedbuff-versions-mid-stream",
                 marks=pytest.mark.slow),  # ~5 s quiet: three FedBuff runs
    # keys from os.urandom every round (the masks cancel); the noise shares from seeded streams
    pytest.param({"run__mode": "fedavg", "secure_agg__protocol": "secagg+", "secure_agg__bits": "16",
                  "privacy__level": "client", "privacy__clip": "0.01", "fed__num_clients": "3"},
                 id="secagg-distributed-dp-fedavg"),
    # cheap rounds: 200 synthetic images, the 3 clients all drawn (q = 1: a fast accountant)
    pytest.param({"run__mode": "fedavg", "model__init_from": "PUBLIC", "privacy__level": "client",
                  "privacy__clip": "0.01", "fed__num_clients": "3", "data__name": "synthetic",
                  "data__synthetic_size": "200"}, id="fine-tuning-dp-fedavg"),
])
def test_resume_equals_uninterrupted(tmp_path, extra):
    if extra.get("model__init_from") == "PUBLIC":  # fine-tuning: first the model it starts from
        public = load_config(None, tiny_overrides(tmp_path, "public", run__seed=7, fed__rounds=1,
                                                  data__name="synthetic", data__synthetic_size=200))
        train(public)
        extra = {**extra, "model__init_from": str(public.run_dir)}
    straight = load_config(None, tiny_overrides(tmp_path, "straight", fed__rounds=3, fed__clients_per_round=3,
                                                **extra))
    train(straight)
    # the same job stopped after round 2, then started again with the full budget
    first = load_config(None, tiny_overrides(tmp_path, "resumed", fed__rounds=2, fed__clients_per_round=3,
                                             **extra))
    train(first)
    stopped = final_checkpoint(first)
    again = load_config(None, tiny_overrides(tmp_path, "resumed", fed__rounds=3, fed__clients_per_round=3,
                                             **extra))
    train(again)
    a, b = final_checkpoint(straight), final_checkpoint(again)
    assert same_bits(a["model"], b["model"])
    assert same_bits(a["server"], b["server"])
    if extra.get("fed__server_opt") == "fedadam":  # the state that had to survive the restart
        assert set(stopped["server"]) == {"m", "v"} and stopped["server"]["v"].abs().max() > 0
    if extra["run__mode"] == "centralized":
        assert stopped["optimizer"]["state"] and a["optimizer"]["state"][0]["step"] == 3 * 23
        assert torch.equal(a["optimizer"]["state"][0]["exp_avg_sq"], b["optimizer"]["state"][0]["exp_avg_sq"])
    if "ema__sigma_rel" in extra:
        assert stopped["ema"]["flat"].abs().max() > 0 and torch.equal(a["ema"]["flat"], b["ema"]["flat"])
        assert not torch.equal(a["ema"]["flat"], torch.cat([t.reshape(-1) for t in a["model"].values()]))
    if extra.get("fed__drift") == "scaffold":  # every client's Adam state and control variate
        clients = stopped["clients"]["clients"]
        assert sorted(clients) == ["0", "1", "2", "3"]
        assert stopped["clients"]["server_control"].abs().max() > 0
        for k, entry in a["clients"]["clients"].items():
            other = b["clients"]["clients"][k]
            assert torch.equal(entry["control"], other["control"])
            assert same_bits(entry["optimizer"]["state"][0], other["optimizer"]["state"][0])
    if extra.get("fed__drift") == "feddyn":  # every client's g_k and the server's h
        assert stopped["clients"]["feddyn_h"].abs().max() > 0
        assert torch.equal(a["clients"]["feddyn_h"], b["clients"]["feddyn_h"])
        for k, entry in a["clients"]["clients"].items():
            assert torch.equal(entry["feddyn_grad"], b["clients"]["clients"][k]["feddyn_grad"])
    if "privacy__level" in extra:  # the accountant's record survived: the same epsilon, exactly
        assert stopped["extra"]["privacy"]["history"] and a["extra"] == b["extra"]
        eps = [json.loads((tmp_path / n / "summary.json").read_text())["privacy"]["epsilon_max"]
               for n in ("straight", "resumed")]
        assert eps[0] == eps[1] > 0
    if extra.get("privacy__level") == "sample":  # and it is the accountant's, for the steps taken
        summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
        sizes = json.loads((tmp_path / "straight" / "partition.json").read_text())["sizes"]
        taken: dict[int, int] = {}
        for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines():
            for k in json.loads(line)["clients"]:
                taken[k] = taken.get(k, 0) + 1
        per_client = summary["privacy"]["epsilon_per_client"]
        assert sorted(per_client, key=int) == [str(k) for k in sorted(taken)]
        for k, rounds in taken.items():
            q, steps = sample_level_step(sizes[k], straight.optim.batch_size, straight.fed.local_epochs)
            assert per_client[str(k)] == epsilon_of([(1.0, q, steps * rounds)], 1e-5)
    if "model__init_from" in extra:  # the init's checksum, in every checkpoint of the run
        assert stopped["identity"] == a["identity"] == b["identity"] == {
            "model.init_from": f"an init of SHA-256 {state_sha256(model_at(tmp_path / 'public', 1))[:16]}"}
    if "fed__compress" in extra:  # every client's error-feedback residual, and the bytes so far
        assert all(e["ef_residual"].abs().max() > 0 for e in stopped["clients"]["clients"].values())
        for k, entry in a["clients"]["clients"].items():
            assert torch.equal(entry["ef_residual"], b["clients"]["clients"][k]["ef_residual"])
        last = [json.loads((tmp_path / n / "metrics.jsonl").read_text().splitlines()[-1])
                for n in ("straight", "resumed")]
        assert last[0]["bytes_up_total"] == last[1]["bytes_up_total"] == 3 * last[0]["bytes_up"] > 0
    if "fed__participation" in extra:  # the past versions a running client still needed, kept exactly
        assert stopped["extra"]["fedbuff"] and a["extra"].keys() == b["extra"].keys()
        assert same_bits(a["extra"]["fedbuff"], b["extra"]["fedbuff"])
    if "model__trainable" in extra:  # base + adapters in the checkpoint; only the adapters moved
        base, _ = build(straight, 10, torch.device("cpu"))
        assert {k for k in a["model"] if ".lora_" not in k} == set(base.state_dict())
        full = ("noise_embed.", "class_embed.", "up.0.0.main.3.", "up.0.0.skip.")  # these train in full
        assert all(torch.equal(v, a["model"][k])
                   for k, v in base.state_dict().items() if not k.startswith(full))
        assert any(a["model"][k].abs().max() > 0 for k in a["model"] if ".lora_up." in k)
        make_trainable(base, straight.model, straight.run.seed)
        assert stopped["ema"]["flat"].numel() == count_trainable(base) < 0.5 * count_parameters(base)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [int(l.split('"round": ')[1].split(",")[0]) for l in lines] == [1, 2, 3]  # round 3 once


def test_checkpoints_keep_the_last_k(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, fed__rounds=4, checkpoint__keep=2))
    train(cfg)
    names = [p.name for p in checkpoint.list_checkpoints(cfg.run_dir)]
    assert names == ["round_0004.pt", "round_0003.pt"]
    state = checkpoint.load_verified(cfg.run_dir / "checkpoints" / "round_0004.pt")
    assert state["round"] == 4 and state["config_hash"] == cfg.hash() and "cpu" in state["rng"]
