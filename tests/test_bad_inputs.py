"""Bad-input catalogue: what users get wrong, run through the real CLI.

Every case must end with a non-zero exit (2 for a single process), exactly one
``fedrun: error:`` line that names the key or path and says what to do, no Python traceback,
and an existing run directory left byte-for-byte as it was. Most cases fail while the config
is validated, before torch is even imported; the data, run-directory and checkpoint cases fail
before the first training step.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import as_args, run_cli, tiny_overrides
from fedrun import checkpoint

Setup = Callable[[Path], None]  # gets the case's work folder (the existing run is under runs/)


@dataclass
class Case:
    id: str
    args: list[str]  # "{work}" is replaced by the case's work folder
    expect: tuple[str, ...]  # all must appear in the error line: the key/path and the fix
    base: bool = True  # start from the tiny config aimed at the existing run directory
    setup: Setup | None = None
    nproc: int = 1
    when: bool = True  # False: the case cannot happen on this machine
    why_not: str = ""


# --------------------------------------------------------------------------------------------
# Files the cases need


def write(rel: str, text: str | bytes) -> Setup:
    def setup(work: Path) -> None:
        path = work / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def png(path: Path, value: int) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)


def image_folder(classes: dict[str, int], broken: str = "") -> Setup:
    """work/imgs/<class>/ with n small PNGs each; ``broken`` adds a file that is not an image."""
    def setup(work: Path) -> None:
        for name, n in classes.items():
            (work / "imgs" / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                png(work / "imgs" / name / f"{i}.png", 40 * i % 256)
        if broken:
            (work / "imgs" / broken).write_bytes(b"\x89PNG\r\n\x1a\n this is not a picture")
    return setup


def existing(rel: str) -> Path:
    return Path("runs") / "existing" / rel


def truncate_checkpoint(work: Path) -> None:
    (path,) = checkpoint.list_checkpoints(work / "runs" / "existing")
    path.write_bytes(path.read_bytes()[:1000])


def lose_saved_config(work: Path) -> None:
    (work / existing("config.toml")).unlink()


IMAGE_FOLDER = ["--data.name", "image_folder", "--data.root", "{work}/imgs", "--run.name", "fresh"]

CASES = [
    # ---- command line and TOML -------------------------------------------------------------
    Case("unknown-key", ["--fed.roundz", "3"], ("fed.roundz", "unknown key", "known:")),
    Case("unknown-section", ["--feds.rounds", "3"], ("feds.rounds", "unknown section", "known:")),
    Case("key-without-section", ["--rounds", "3"], ("rounds", "section.name", "fed.rounds")),
    Case("wrong-type-cli", ["--fed.rounds", "three"], ("fed.rounds", "expected an integer")),
    Case("wrong-type-toml", ["--config", "{work}/job.toml"], ("fed.rounds", "drop the quotes"),
         base=False, setup=write("job.toml", '[fed]\nrounds = "3"\n')),
    Case("float-for-int-toml", ["--config", "{work}/job.toml"], ("fed.local_epochs", "integer"),
         base=False, setup=write("job.toml", "[fed]\nlocal_epochs = 2.5\n")),
    Case("key-outside-section-toml", ["--config", "{work}/job.toml"], ("rounds", "[section]"),
         base=False, setup=write("job.toml", "rounds = 3\n")),
    Case("invalid-toml", ["--config", "{work}/job.toml"], ("job.toml", "not valid TOML"),
         base=False, setup=write("job.toml", "[fed\nrounds = 3\n")),
    Case("toml-not-utf8", ["--config", "{work}/job.toml"], ("job.toml", "not valid TOML"),
         base=False, setup=write("job.toml", b"[fed]\nrounds = 3  # \xff\xfe\n")),
    Case("missing-config-file", ["--config", "{work}/nope.toml"], ("--config", "nope.toml", "existing TOML")),
    Case("config-without-file-name", ["--config"], ("--config", "missing file name")),
    Case("override-without-value", ["--fed.rounds"], ("fed.rounds", "missing value", "--fed.rounds VALUE")),
    Case("stray-positional-value", ["--fed.rounds", "3", "4"], ("4", "--section.key value")),
    Case("bad-list-value", ["--model.channel_mults", "1,x"], ("model.channel_mults[1]", "integer")),
    Case("bad-bool", ["--data.hflip", "maybe"], ("data.hflip", "true or false")),
    Case("unknown-choice", ["--run.mode", "fedprox"], ("run.mode", "choose one of", "centralized")),
    Case("unknown-dataset", ["--data.name", "imagenet"], ("data.name", "choose one of", "image_folder")),
    # ---- impossible values -----------------------------------------------------------------
    Case("negative-rounds", ["--fed.rounds", "-1"], ("fed.rounds", ">= 1")),
    Case("zero-local-epochs", ["--fed.local_epochs", "0"], ("fed.local_epochs", ">= 1")),
    Case("alpha-zero", ["--fed.alpha", "0"], ("fed.alpha", "> 0")),
    Case("alpha-negative", ["--fed.alpha", "-0.5"], ("fed.alpha", "> 0")),
    Case("clients-per-round-above-clients", ["--fed.clients_per_round", "5"],
         ("fed.clients_per_round", "between 1 and fed.num_clients (4)")),
    Case("nan-learning-rate", ["--optim.lr", "nan"], ("optim.lr", "finite")),
    Case("inf-learning-rate-toml", ["--config", "{work}/job.toml"], ("optim.lr", "finite"),
         base=False, setup=write("job.toml", "[optim]\nlr = inf\n")),
    Case("zero-batch", ["--optim.batch_size", "0"], ("optim.batch_size", ">= 1")),
    Case("negative-seed", ["--run.seed", "-1"], ("run.seed", ">= 0")),
    Case("image-size-unet-cannot-halve", ["--data.image_size", "17"],
         ("data.image_size", "cannot be halved", "multiple of 2")),
    Case("image-size-too-deep", ["--data.image_size", "20", "--model.channel_mults", "1,2,2,2"],
         ("data.image_size", "multiple of 8")),
    Case("attention-level-out-of-range", ["--model.attention_levels", "2"], ("model.attention_levels", "0..1")),
    Case("channels-1-for-cifar10", ["--data.name", "cifar10", "--data.channels", "1"],
         ("data.channels", "cifar10", "data.channels = 3")),
    Case("run-name-with-slash", ["--run.name", "a/b"], ("run.name", "without '/'")),
    Case("cuda-on-a-cpu-machine", ["--run.device", "cuda", "--run.name", "fresh"], ("run.device", "--run.device cpu"),
         when=not torch.cuda.is_available(), why_not="a CUDA device is visible here"),
    # ---- partitions --------------------------------------------------------------------------
    Case("min-client-size-above-data", ["--fed.min_client_size", "400", "--run.name", "fresh"],
         ("fed.min_client_size", "exceeds", "lower fed.min_client_size")),
    Case("min-client-size-never-drawn", ["--fed.min_client_size", "300", "--fed.alpha", "0.05",
                                         "--fed.max_resample", "3", "--run.name", "fresh"],
         ("fed.min_client_size", "raise fed.alpha")),
    # ---- data sets ---------------------------------------------------------------------------
    Case("image-folder-root-missing", IMAGE_FOLDER, ("data.root", "imgs", "is not a folder")),
    Case("image-folder-without-images", IMAGE_FOLDER, ("data.root", "no images found"),
         setup=image_folder({"a": 0, "b": 0})),
    Case("image-folder-one-class", IMAGE_FOLDER, ("data.root", "1 class folder", "at least 2"),
         setup=image_folder({"only": 3})),
    Case("image-folder-unreadable-image", IMAGE_FOLDER, ("data.root", "broken.png", "remove or replace"),
         setup=image_folder({"a": 2, "b": 2}, broken="b/broken.png")),
    Case("cifar10-absent-download-off", ["--data.name", "cifar10", "--data.channels", "3", "--data.root",
                                         "{work}/empty", "--run.name", "fresh"],
         ("data.root", "CIFAR-10 not found", "data.download = true"), setup=lambda w: (w / "empty").mkdir()),
    # ---- run directory and checkpoints -------------------------------------------------------
    Case("run-dir-under-a-file", ["--run.out_dir", "{work}/file.txt/sub"], ("run.out_dir", "file.txt", "writable"),
         setup=write("file.txt", "a file, not a folder\n")),
    Case("existing-run-dir-other-config", ["--model.base_channels", "16"],
         ("run.name", "different config", "--checkpoint.resume force")),
    Case("checkpoint-from-other-config", ["--optim.lr", "5e-4"], ("round_0001.pt", "different config",
                                                                  "--checkpoint.resume force"),
         setup=lose_saved_config),
    Case("only-checkpoint-truncated", [], ("checkpoint", "unusable", "delete the folder"), setup=truncate_checkpoint),
    Case("saved-config-unreadable", [], ("config.toml", "unreadable saved config", "another run.name"),
         setup=write(str(existing("config.toml")), "[fed\n")),
    Case("resume-never-but-checkpoints", ["--checkpoint.resume", "never"],
         ("checkpoint.resume", "already holds checkpoints", "another --run.name")),
    # ---- evaluation --------------------------------------------------------------------------
    Case("inception-weights-missing", ["--eval.enabled", "true", "--eval.feature_extractor", "inception",
                                       "--eval.inception_weights", "{work}/inception-2015-12-05.pt"],
         ("inception-2015-12-05.pt", "eval.inception_weights", "classifier")),
    # ---- more ranks than a setting allows (real torchrun, 2 ranks) -----------------------------
    Case("centralized-batch-not-divisible-by-ranks", ["--run.mode", "centralized", "--optim.batch_size", "63",
                                                      "--run.name", "fresh"],
         ("optim.batch_size", "2 ranks", "multiple of 2"), nproc=2),
    Case("config-error-under-torchrun-is-said-once", ["--fed.alpha", "0"], ("fed.alpha", "> 0"), nproc=2),
]


# --------------------------------------------------------------------------------------------
# Running the catalogue: every case in its own work folder with a copy of one finished run.
# The cases run a few at a time (most of their time is importing torch), then each test checks one.


def base_overrides(out_dir: Path) -> dict[str, str]:
    return tiny_overrides(out_dir, "existing", fed__rounds=1, eval__enabled="false")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def worker_stderr(log_dir: Path) -> str:
    """torchrun --redirects 3: each rank's stderr is a file; torchrun's own report is not ours."""
    return "".join(p.read_text() for p in sorted(log_dir.rglob("stderr.log")))


@dataclass
class Outcome:
    returncode: int
    stderr: str
    before: dict[str, tuple[bytes, int]]
    after: dict[str, tuple[bytes, int]]


def run_case(case: Case, work: Path, finished: Path) -> Outcome:
    run_dir = work / "runs" / "existing"
    shutil.copytree(finished, run_dir)  # copy2: mtimes travel too
    if case.setup is not None:
        case.setup(work)
    before = snapshot(run_dir)
    args = [a.replace("{work}", str(work)) for a in case.args]
    if case.base:
        args = as_args(base_overrides(work / "runs")) + args
    if case.nproc == 1:
        res = run_cli(args, timeout=180)
        stderr = res.stderr
    else:
        log_dir = work / "torchrun_logs"
        res = run_cli(args, nproc=case.nproc, timeout=180,
                      extra_torchrun=["--log-dir", str(log_dir), "--redirects", "3"])
        stderr = worker_stderr(log_dir)
    return Outcome(res.returncode, stderr, before, snapshot(run_dir))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    root = tmp_path_factory.mktemp("bad_inputs")
    finished = root / "finished" / "runs"
    res = run_cli(as_args(base_overrides(finished)))
    assert res.returncode == 0, res.stderr[-3000:]
    todo = [c for c in CASES if c.when]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {c.id: pool.submit(run_case, c, root / c.id, finished / "existing") for c in todo}
        return {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_fails_cleanly(case: Case, outcomes):
    if not case.when:
        pytest.skip(case.why_not)
    out = outcomes[case.id]
    if case.nproc == 1:
        assert out.returncode == 2, out.stderr[-3000:]
    else:
        assert out.returncode != 0  # torchrun reports its own failure; the workers said why
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1, out.stderr[-3000:]  # one message, said once (rank 0 only under torchrun)
    for text in case.expect:
        assert text in errors[0], f"{text!r} missing from: {errors[0]}"
    assert out.after == out.before  # nothing in the existing run directory was rewritten


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 25 and len({c.id for c in CASES}) == len(CASES)
