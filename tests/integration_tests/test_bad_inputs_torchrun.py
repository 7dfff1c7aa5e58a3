"""Bad input under torchrun: the error is said once (by rank 0 for a config error), in one line,
with no traceback from any rank, and torchrun exits non-zero."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import as_args, run_cli, tiny_overrides


def worker_stderr(log_dir: Path) -> str:
    """torchrun --redirects 3: each rank's stderr is a file; torchrun's own report is not ours."""
    return "".join(p.read_text() for p in sorted(log_dir.rglob("stderr.log")))


@pytest.mark.slow  # ~5 s each under torchrun; the in-process catalogue is test_bad_inputs.py
@pytest.mark.parametrize("args, expect", [
    pytest.param(["--run.mode", "centralized", "--optim.batch_size", "63"],
                 ("optim.batch_size", "2 ranks", "multiple of 2"),
                 id="centralized-batch-not-divisible-by-ranks"),
    pytest.param(["--fed.alpha", "0"], ("fed.alpha", "> 0"), id="config-error-is-said-once"),
])
def test_bad_input_under_torchrun_fails_cleanly(tmp_path, args, expect):
    log_dir = tmp_path / "torchrun_logs"
    res = run_cli(as_args(tiny_overrides(tmp_path, "fresh")) + args, nproc=2, timeout=180,
                  extra_torchrun=["--log-dir", str(log_dir), "--redirects", "3"])
    err = worker_stderr(log_dir)
    assert res.returncode != 0  # torchrun reports its own failure; the workers said why
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1, err[-3000:]
    for text in expect:
        assert text in errors[0], f"{text!r} missing from: {errors[0]}"
