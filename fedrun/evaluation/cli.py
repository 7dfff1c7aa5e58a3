"""``fedrun eval RUN_DIR [--checkpoint FILE] [--section.key VALUE ...]``: score a saved checkpoint.

The model is built by ``fedrun.models.build`` exactly as training builds it (same init path,
same memory layout), so a checkpoint scored here gives the numbers training logged for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from .. import checkpoint, dist
from ..config import load_config, parse_overrides
from ..data import load_split
from ..errors import CheckpointError, ConfigError
from ..models import build
from ..partition import partition
from .evaluator import Evaluator, check_eval_sizes, check_inception_weights, scores_table


def eval_main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        raise ConfigError("eval: usage: fedrun eval RUN_DIR [--checkpoint FILE] [--eval.num_samples N ...]")
    run_dir, rest = Path(argv[0]), argv[1:]
    ckpt_path: Path | None = None
    if "--checkpoint" in rest:
        i = rest.index("--checkpoint")
        if i + 1 >= len(rest):
            raise ConfigError("--checkpoint: missing file name")
        ckpt_path = Path(rest[i + 1])
        rest = rest[:i] + rest[i + 2:]
    if not (run_dir / "config.toml").is_file():
        raise ConfigError(f"eval: {run_dir} holds no config.toml; pass a run directory made by fedrun")
    overrides = {"eval.enabled": "true", **parse_overrides(rest)}
    cfg = load_config(run_dir / "config.toml", overrides)
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    check_inception_weights(cfg)
    if ckpt_path is None:
        found = checkpoint.list_checkpoints(run_dir)
        if not found:
            raise CheckpointError(f"eval: {run_dir}/checkpoints holds no checkpoint; "
                                             f"train first or pass --checkpoint FILE")
        ckpt_path = found[0]
    state = checkpoint.load_verified(ckpt_path)
    train_set, test_set = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    check_eval_sizes(cfg, test_set)
    f = cfg.fed  # the run's partition, drawn again from its seed: the global model against each client
    shards = partition(train_set.labels.numpy(), f.num_clients, f.partition, f.alpha, cfg.run.seed,
                       f.min_client_size, f.max_resample) if cfg.run.mode == "fedavg" else None

    info = dist.init(cfg.run.device, cfg.run.threads)
    try:
        model, diffusion = build(cfg, train_set.num_classes, info.device)
        model.load_state_dict(state["model"])
        ema = state.get("ema", {}).get("flat")
        if ema is not None:  # the run sampled and scored its EMA: so does its evaluation
            from ..flat import load_flat_  # a leaf module: no import cycle
            load_flat_(model, ema.to(info.device))
        evaluator = Evaluator(cfg, info, train_set, test_set, shards=shards)
        scores = evaluator.evaluate(model, diffusion, int(state["round"]))
        if info.is_main and scores is not None:
            row = {"round": int(state["round"]), "checkpoint": str(ckpt_path), **scores}
            trained = load_config(run_dir / "config.toml").diffusion.guidance
            tag = f"_guidance{cfg.diffusion.guidance:g}" if cfg.diffusion.guidance != trained else ""
            out = run_dir / "eval" / f"{ckpt_path.stem}{tag}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(row, indent=2))
            Console(stderr=True).print(scores_table([row], title=f"{run_dir} @ round {row['round']}"))
            Console(stderr=True).print(f"scores written to {out}")
        return 0
    finally:
        dist.shutdown()
