"""Launcher environments as pure functions of an environment dict (no processes): SLURM node
lists and task counts, and which variables win when torchrun runs inside a SLURM job."""

from __future__ import annotations

import pytest

from fedrun.dist import first_slurm_host, launch_env, restarts_share_agent_store, slurm_tasks_on_node


def test_node_list_first_host():
    assert first_slurm_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_slurm_host("node7") == "node7"
    assert first_slurm_host("a1,b2") == "a1"
    assert first_slurm_host("gpu[01-02]-ib") == "gpu01-ib"
    assert first_slurm_host("rack[1-2]-n[07-08],login1") == "rack1-n07"
    with pytest.raises(ValueError):
        first_slurm_host("gpu[01")


def test_tasks_per_node_formats():
    assert slurm_tasks_on_node("4", 0) == 4
    assert [slurm_tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]
    assert [slurm_tasks_on_node("2,1", n) for n in range(2)] == [2, 1]
    with pytest.raises(ValueError):
        slurm_tasks_on_node("four", 0)


def test_launch_env_srun_task_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "7", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
           "SLURM_TASKS_PER_NODE": "3(x2),1", "SLURM_STEP_TASKS_PER_NODE": "2(x2),3",
           "SLURM_JOB_NODELIST": "gpu[003-005]", "SLURM_JOB_ID": "123456"}
    got = launch_env(env)
    assert (got["rank"], got["world_size"], got["local_rank"]) == (5, 7, 1)
    assert got["local_world_size"] == 3  # the step's list, this node's (third) entry
    assert got["master_addr"] == "gpu003" and got["master_port"] == str(20000 + 123456 % 20000)
    # an explicit LOCAL_WORLD_SIZE / MASTER_ADDR (exported by a wrapper) wins
    got = launch_env({**env, "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (got["local_world_size"], got["master_addr"], got["master_port"]) == (4, "10.0.0.1", "1234")
    # torchrun inside an allocation: its variables win over SLURM's
    got = launch_env({**env, "RANK": "0", "WORLD_SIZE": "16", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "8"})
    assert (got["rank"], got["world_size"], got["local_world_size"]) == (0, 16, 8)
    # one task: a plain single process, no process group
    assert launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})["world_size"] == 1


def test_restarts_with_the_agent_store_are_detected():
    agent = {"TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert restarts_share_agent_store({**agent, "TORCHELASTIC_MAX_RESTARTS": "3"})
    assert not restarts_share_agent_store({**agent, "TORCHELASTIC_MAX_RESTARTS": "0"})
    assert not restarts_share_agent_store({"TORCHELASTIC_USE_AGENT_STORE": "False",
                                           "TORCHELASTIC_MAX_RESTARTS": "3"})
