"""A diffusers-arch run end to end through the command line (issue 28): one process and two
torchrun ranks train the same UNet2DModel bit for bit; ``fedrun export`` writes the two-rank run as
a diffusers folder; a fresh process in which fedrun cannot be imported loads it with
``DiffusionPipeline.from_pretrained`` and samples, for a fixed seed, what fedrun's own sampler
samples.

Tolerance of the last comparison: the pipeline draws the same noise from the same generator in
the same order and runs the same DDIM update (fedrun.export), so the difference is float rounding
alone: the scheduler's alphas_cumprod is a float32 cumulative product of the exported betas where
fedrun computes each level's alpha from its log-SNR, and the UNet gets an integer timestep where
fedrun's wrapper computes T t - 1 from a float32 log-SNR. Measured: about 1e-6 on [0, 1] images;
the bound, 1e-4, is 1/40 of an 8-bit grey level: the 8-bit images are the same but for a value
that lies that close to a rounding boundary (one level at most).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedrun.saved_run import open_run

from helpers import as_args, clean_env, model_at, run_cli, run_cli_together, same_bits, tiny_overrides

pytest.importorskip("diffusers", reason="the diffusers extra: pip install -e '.[diffusers]'")

TINY_D = dict(model__arch="diffusers", model__block_out_channels="4,8", model__layers_per_block=1,
              model__down_block_types="DownBlock2D,AttnDownBlock2D",
              model__up_block_types="AttnUpBlock2D,UpBlock2D", model__norm_num_groups=4,
              model__attention_head_dim=4, model__label_dropout=0.2, diffusion__guidance=1.0,
              fed__num_clients=5, fed__clients_per_round=3, fed__rounds=2)

SAMPLE_WITHOUT_FEDRUN = """
import sys
sys.modules["fedrun"] = None  # any import of fedrun fails: only torch and diffusers are used
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(class_labels=list(range(10)), num_inference_steps=10, eta=1.0,
              generator=torch.Generator().manual_seed(7), output_type="pt").images
torch.save(images, sys.argv[2])
print(type(pipe).__name__, pipe.config.guidance_scale, pipe.config.null_class)
"""


@pytest.mark.slow  # two trainings, torchrun, and a fresh interpreter that imports diffusers (~30 s)
def test_two_ranks_train_the_bits_of_one_and_the_export_samples_without_fedrun(tmp_path):
    one, two = run_cli_together((as_args(tiny_overrides(tmp_path, "one", **TINY_D)), 1),
                                (as_args(tiny_overrides(tmp_path, "two", **TINY_D)), 2))
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    for r in (1, 2):
        assert same_bits(model_at(tmp_path / "one", r), model_at(tmp_path / "two", r)), r
    assert not same_bits(model_at(tmp_path / "two", 1), model_at(tmp_path / "two", 2))

    out = tmp_path / "exported"
    res = run_cli(["export", str(tmp_path / "two"), str(out), "--format", "diffusers"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sample it with diffusers" in res.stdout
    assert {p.name for p in out.iterdir()} == {"unet", "scheduler", "model_index.json", "pipeline.py",
                                              "fedrun.json", "README.md"}

    sampled = subprocess.run([sys.executable, "-c", SAMPLE_WITHOUT_FEDRUN, str(out), str(tmp_path / "x.pt")],
                             env={**clean_env(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                             capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.split() == ["FedrunClassConditionalPipeline", "1.0", "10"]
    theirs = torch.load(tmp_path / "x.pt")
    run = open_run(tmp_path / "two", device="cpu", test_split=False)
    ours = run.diffusion.sample(run.model, torch.arange(10), (1, 16, 16), 10, 1.0,
                                generator=torch.Generator().manual_seed(7)) / 2 + 0.5
    diff = (theirs - ours).abs().max().item()
    assert diff < 1e-4, diff  # module docstring
    # the same 8-bit images, but where a value lies within the difference of a rounding boundary
    assert ((theirs * 255).round() - (ours * 255).round()).abs().max() <= 1


def test_export_command_line_errors_are_one_line(tmp_path, capsys):
    """``fedrun export``'s own mistakes answer in one line (in process: fedrun.__main__.main)."""
    from fedrun.__main__ import main
    for argv, line in [
        (["--format", "onnx"],
         "fedrun: error: export: --format 'onnx' is not one fedrun writes; use --format diffusers"),
        ([], f"fedrun: error: RUN_DIR: {tmp_path / 'nowhere'} holds no config.toml; pass a run directory "
             f"made by fedrun (runs/<run.name>)"),
    ]:
        assert main(["export", str(tmp_path / "nowhere"), str(tmp_path / "out"), *argv]) != 0
        assert capsys.readouterr().err.strip().splitlines() == [line]
    assert main(["export", str(tmp_path / "nowhere")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "export: the following arguments are required: OUT; usage: fedrun export" \
        in err[0]
    assert not (tmp_path / "out").exists()
