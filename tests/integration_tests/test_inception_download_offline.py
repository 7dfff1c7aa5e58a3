"""The README's GPU line asks for downloads (``--data.download true``): with the network blocked,
a job that needs clean-fid's Inception file tries to fetch it once and stops before training with
one line that says what to do (exit code 6), writing no partial file. (The download itself, against
a file served on loopback: tests/unit_tests/test_inception_download.py.)"""

from __future__ import annotations

from helpers import as_args, network_attempts, offline_env, run_cli, tiny_overrides


def test_no_network_is_one_clear_line_before_training(tmp_path):
    env = offline_env(tmp_path)
    target = tmp_path / "weights" / "inception-2015-12-05.pt"
    o = tiny_overrides(tmp_path, "needs_inception", eval__enabled="true", eval__feature_extractor="inception",
                       eval__inception_weights=target, data__download="true")
    res = run_cli(as_args(o), env=env)
    errors = [line for line in res.stderr.splitlines() if line.startswith("fedrun: error:")]
    assert res.returncode == 6 and len(errors) == 1, res.stderr[-3000:]
    assert "data.download: could not download the Inception weights" in errors[0]
    assert "network access blocked" in errors[0] and str(target) in errors[0]
    assert "nvlabs-fi-cdn.nvidia.com" in network_attempts(env)  # clean-fid's own URL was tried
    assert not target.exists() and [p.name for p in target.parent.iterdir()] in ([], [target.name + ".lock"])
    assert not (tmp_path / "needs_inception" / "checkpoints").exists()  # nothing trained
