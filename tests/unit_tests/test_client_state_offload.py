"""Kept per-client state lives off the device between a client's rounds: in host memory up to
``fed.client_state_memory_mb``, then in memory-mapped files; what comes back is bit-equal, a
copy (an update left out cannot change the kept state), and every state reaches the checkpoint."""

from __future__ import annotations

import torch

from fedrun.federated.client_state import ClientStates


def adam_like(client: int, n: int = 200_000) -> dict:
    g = torch.Generator().manual_seed(client)
    return {"state": {0: {"step": torch.tensor(float(client)), "exp_avg": torch.randn(n, generator=g),
                          "exp_avg_sq": torch.rand(n, generator=g)}},
            "param_groups": [{"lr": 1e-3, "params": [0]}]}


def same(a: dict, b: dict) -> bool:
    x, y = a["state"][0], b["state"][0]
    return all(torch.equal(x[k], y[k]) for k in ("step", "exp_avg", "exp_avg_sq")) and \
        a["param_groups"] == b["param_groups"]


def test_states_past_the_budget_go_to_files_and_come_back_bit_equal(tmp_path):
    store = ClientStates(("optimizer",), torch.device("cpu"), memory_mb=2, spill_dir=tmp_path)
    for k in range(6):  # 1.6 MB each: at most one stays in the 2 MiB of host memory
        store.commit(k, {"optimizer": adam_like(k), "other_kind": torch.ones(3)})
    assert store.held <= 2 * 2**20 and len(store.entries) == 1 and sorted(store.spilled) == [0, 1, 2, 3, 4]
    files = list(tmp_path.glob("fedrun-client-state-*/client_*.pt"))
    assert len(files) == 5
    for k in range(6):
        assert same(store.get(k)["optimizer"], adam_like(k)) and "other_kind" not in store.get(k)
    assert store.get(99) == {}
    # a client that trains again comes back to memory (its file goes), the oldest one leaves
    store.commit(2, {"optimizer": adam_like(20)})
    assert 2 in store.entries and 2 not in store.spilled and 5 in store.spilled
    assert same(store.get(2)["optimizer"], adam_like(20))
    gathered = store.gather()  # one process: rank 0's own states, every one of them
    assert sorted(gathered["clients"], key=int) == [str(k) for k in range(6)]
    assert same(gathered["clients"]["5"]["optimizer"], adam_like(5))
    store.close()
    assert not list(tmp_path.glob("fedrun-client-state-*"))


def test_get_hands_out_a_copy():
    """The trainer's optimizer updates what it gets in place; the kept state must not move unless
    the round commits it (a client whose update is left out keeps its old state)."""
    store = ClientStates(("optimizer",), torch.device("cpu"))
    store.commit(1, {"optimizer": adam_like(1, n=10)})
    got = store.get(1)["optimizer"]
    got["state"][0]["exp_avg"].add_(1.0)
    assert same(store.get(1)["optimizer"], adam_like(1, n=10))
    assert got["state"][0]["step"].device.type == "cpu"  # Adam's step count stays a CPU scalar
