"""``fedrun eval RUN_DIR [--checkpoint FILE] [--section.key VALUE ...]``: score a saved checkpoint.

``--data.name`` scores against another data set of the same image size and classes, e.g. a
public model (configs/digits_public.toml, printed digits) against the handwritten test split:
``fedrun eval runs/digits_public --data.name digits`` writes ``eval/round_0100_digits.json``.

The run is opened by ``fedrun.saved_run.open_run``: the model built by ``fedrun.models.build``
exactly as training builds it (same init path, same memory layout), holding the EMA when the
checkpoint has one, from ``--checkpoint`` or else the newest checkpoint that passes its checksum
(a newest one cut short by a crash is skipped with a warning). So a checkpoint scored here gives
the numbers training logged for it (with their intervals, ``eval.bootstrap``). The generated
images' features go beside the scores (``eval/<checkpoint>_features.npz``) for ``fedrun compare``;
overriding eval.steps or eval.num_samples tags both file names (``_steps50``, ``_n1440``). The
command line is read before torch is imported, so a mistake in it answers at once.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import dist
from ..argparsing import ArgParser
from ..config import parse_overrides
from ..errors import ConfigError

USAGE = "fedrun eval RUN_DIR [--checkpoint FILE] [--section.key VALUE ...]"


def parse_args(argv: list[str]) -> tuple[Path, Path | None, dict[str, str]]:
    """(run directory, checkpoint or None, --section.key overrides) of ``fedrun eval ...``."""
    parser = ArgParser("eval", USAGE)
    parser.add_argument("run_dir", metavar="RUN_DIR")
    parser.add_argument("--checkpoint", metavar="file name")
    args, rest = parser.parse_known_args(argv)
    # argparse cannot know that an override takes a value: in `--eval.steps 5 RUN_DIR` it would
    # take 5 for the run directory, so the run directory must come before any override
    before = argv[:argv.index(args.run_dir)]
    if any(a.startswith("--") and a.split("=", 1)[0] != "--checkpoint" for a in before):
        raise ConfigError(f"eval: RUN_DIR goes before the --section.key overrides; usage: {USAGE}")
    checkpoint = Path(args.checkpoint) if args.checkpoint is not None else None
    return Path(args.run_dir), checkpoint, parse_overrides(rest)


def eval_main(argv: list[str]) -> int:
    run_dir, checkpoint, overrides = parse_args(argv)
    from ..logs import log_console  # after the command line: a mistake in it answers at once
    from ..saved_run import load_run_config, open_run
    from .evaluator import Evaluator, check_eval_sizes, check_inception_weights, scores_table
    overrides = {"eval.enabled": "true", **overrides}
    check_inception_weights(load_run_config(run_dir, overrides))  # before any data is read
    # every user error (config, checkpoint, data, sample counts) before the process group
    run = open_run(run_dir, checkpoint, overrides=overrides)
    cfg = run.cfg
    check_eval_sizes(cfg, run.test)

    info = dist.init(cfg.run.device, cfg.run.threads, cfg.run.keep_freed_memory)
    try:
        # the run's partition, drawn again from its seed: the global model against each client
        evaluator = Evaluator(cfg, info, run.train, run.test, shards=run.clients)
        trained = load_run_config(run_dir)
        guidance = cfg.diffusion.guidance
        tag = f"_guidance{guidance:g}" if guidance != trained.diffusion.guidance else ""
        # scored against another data set (a public model against the private test split)
        tag += f"_{cfg.data.name}" if cfg.data.name != trained.data.name else ""
        tag += f"_steps{cfg.eval.steps}" if cfg.eval.steps != trained.eval.steps else ""
        tag += f"_n{cfg.eval.num_samples}" if cfg.eval.num_samples != trained.eval.num_samples else ""
        features = run_dir / "eval" / f"{run.checkpoint.stem}{tag}_features.npz"  # for fedrun compare
        scores = evaluator.evaluate(run.model, run.diffusion, run.round, features_to=features)
        if info.is_main and scores is not None:
            row = {"round": run.round, "checkpoint": str(run.checkpoint), "weights": run.weights, **scores}
            out = run_dir / "eval" / f"{run.checkpoint.stem}{tag}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(row, indent=2))
            log_console().print(scores_table([row], title=f"{run_dir} @ round {row['round']}"))
            log_console().print(f"scores written to {out}, the generated features to {features}")
        return 0
    finally:
        dist.shutdown()
