"""Command line: ``torchrun --nproc_per_node=W -m fedrun [--config FILE] [--section.key VALUE ...]``.

Subcommands: ``fedrun [train]`` (the default), ``fedrun eval RUN_DIR``, ``fedrun report RUN_DIR...``,
``fedrun audit RUN_DIR`` (membership inference and memorisation of a trained run),
``fedrun export RUN_DIR OUT --format diffusers`` (a diffusers pipeline folder).
With no --config, the embedded digits default (configs/digits.toml) runs: no download needed.
Every subcommand parses its options with argparse (``fedrun.argparsing.ArgParser``); the
``--section.key VALUE`` overrides that argparse does not know go to ``config.parse_overrides``.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

# no torch in these: a config error answers in milliseconds
from .argparsing import ArgParser
from .dist import exit_process, launch_rank
from .errors import ConfigError, FedrunError

USAGE = """\
usage: torchrun --nproc_per_node=W -m fedrun [--config FILE] [--section.key VALUE ...]
       fedrun [train] [--config FILE] [--section.key VALUE ...]
       fedrun eval RUN_DIR [--checkpoint FILE] [--section.key VALUE ...]
       fedrun report RUN_DIR [RUN_DIR ...] [--out DIR]
       fedrun compare RUN_A RUN_B [RUN ...] [--resamples N] [--confidence C] [--out FILE]
       fedrun audit RUN_DIR [--out FILE] [--samples N] [--levels U,U,...] [--draws N] [--k K]
       fedrun export RUN_DIR OUT [--format diffusers] [--checkpoint FILE] [--force]

Trains a class-conditional diffusion model (DDPM U-Net) with FedAvg across clients, one or
more clients per rank, or the centralized baseline (--run.mode centralized).

  --config FILE        TOML job file (default: configs/digits.toml, the embedded digits set)
  --section.key VALUE  override one setting, e.g. --fed.rounds 3 --data.root /data
                       (also --section.key=VALUE); sections: run data model diffusion fed
                       optim train ema privacy checkpoint sample eval; every key with its
                       default and text: docs/config.md
  --print-config       print the resolved config as TOML and exit
  -h, --help           this text
"""


def default_config_path() -> Path | None:
    """configs/digits.toml of the source checkout (pip install -e keeps it next to fedrun/)."""
    path = Path(__file__).resolve().parents[1] / "configs" / "digits.toml"
    return path if path.is_file() else None


def parse_train_args(argv: list[str]) -> tuple[Path | None, dict[str, str], bool]:
    """(config file, overrides, --print-config) of ``fedrun [train] ...``."""
    from .config import parse_overrides
    parser = ArgParser("", "fedrun [train] [--config FILE] [--print-config] [--section.key VALUE ...]")
    parser.add_argument("--config", metavar="file name")
    parser.add_argument("--print-config", action="store_true")
    args, rest = parser.parse_known_args(argv)
    if args.config == "":
        raise ConfigError("--config: missing file name; write --config configs/cifar10.toml")
    config_path = Path(args.config) if args.config is not None else default_config_path()
    return config_path, parse_overrides(rest), args.print_config


def train_main(argv: list[str]) -> int:
    from .config import load_config
    path, overrides, print_config = parse_train_args(argv)
    cfg = load_config(path, overrides)
    if print_config:
        print(cfg.to_toml())
        return 0
    from .train import train  # after validation: a config error answers without importing torch
    train(cfg)
    return 0


def _quiet_warnings() -> None:
    """One line per warning, from rank 0 only: other ranks stay quiet unless they fail."""
    if launch_rank() != 0:
        warnings.simplefilter("ignore")
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"fedrun: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # e.g. `fedrun --print-config | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_warnings()
    command = argv[0] if argv and not argv[0].startswith("-") else "train"
    if argv and command == argv[0]:
        argv = argv[1:]
    # also `fedrun eval --help`; report parses (and answers) its own --help
    if command == "help" or (command != "report" and argv[:1] in (["-h"], ["--help"])):
        from .config_reference import methods_help  # the registries: imports the methods (and torch)
        print(USAGE + "\n" + methods_help())
        return 0
    try:
        if command == "train":
            return train_main(argv)
        if command == "eval":
            from .evaluation.cli import eval_main
            return eval_main(argv)
        if command == "report":
            from .evaluation.report import main as report_main
            return report_main(argv)
        if command == "audit":
            from .privacy.audit import audit_main
            return audit_main(argv)
        if command == "compare":
            from .evaluation.compare import compare_main
            return compare_main(argv)
        if command == "export":
            from .export import export_main
            return export_main(argv)
        print(f"fedrun: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    except FedrunError as exc:
        # One line, no traceback; a config error is the same on every rank, so rank 0 says it.
        rank = launch_rank()
        if rank == 0 or not isinstance(exc, ConfigError):
            prefix = f"[rank {rank}] " if rank else ""
            print(f"fedrun: error: {prefix}{exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    exit_process(main())
