"""The command line, in-process through fedrun.__main__.main (what `python -m fedrun` calls)."""

from fedrun.__main__ import USAGE, main
from fedrun.config_reference import methods_help


def test_help_prints_usage_and_exits_0(capsys):
    for argv in (["--help"], ["-h"], ["help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith(USAGE) and out.strip() == (USAGE + "\n" + methods_help()).strip()
        assert "torchrun --nproc_per_node" in out and "--section.key" in out
        assert "--fed.drift none | fedprox | scaffold | feddyn" in out and "--fed.prox_mu" in out


def test_no_config_means_the_digits_default(capsys):
    assert main(["--print-config", "--fed.rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert 'name = "digits"' in out and "rounds = 1" in out


def test_a_bad_key_is_one_line_and_exit_code_2(capsys):
    assert main(["--fed.roundz", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("fedrun: error: fed.roundz") and "known:" in err


def test_an_unknown_command_is_refused_with_the_usage(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "usage:" in err


def one_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("fedrun: error:")]
    assert len(errors) == 1 and len(err.splitlines()) == 1, err
    return errors[0]


def test_train_options_and_overrides_mix_in_any_order():
    from fedrun.__main__ import parse_train_args
    path, overrides, print_config = parse_train_args(
        ["--fed.rounds", "3", "--config", "job.toml", "--print-config", "--run.name=a", "--optim.lr", "-1"])
    assert str(path) == "job.toml" and print_config
    assert overrides == {"fed.rounds": "3", "run.name": "a", "optim.lr": "-1"}
    path, overrides, print_config = parse_train_args(["--config=other.toml"])
    assert str(path) == "other.toml" and overrides == {} and not print_config


def test_eval_and_audit_options_are_parsed_by_argparse(capsys):
    from fedrun.evaluation.cli import parse_args as eval_args
    from fedrun.privacy.audit import parse_args as audit_args
    run_dir, ckpt, overrides = eval_args(["runs/x", "--eval.steps", "5", "--checkpoint", "c.pt",
                                          "--eval.per_class=false"])
    assert (str(run_dir), str(ckpt)) == ("runs/x", "c.pt")
    assert overrides == {"eval.steps": "5", "eval.per_class": "false"}
    argv = ["runs/x", "--samples", "7", "--levels=0.2,0.4", "--max-members", "9", "--threshold", "0.25",
            "--out", "a.json"]
    run_dir, out, s, device, ckpt, overrides = audit_args(argv + ["--data.name", "digits"])
    assert (str(run_dir), str(out), device, ckpt) == ("runs/x", "a.json", "cpu", None)
    assert overrides == {"data.name": "digits"}  # what else the run is audited against
    assert (s.samples, s.levels, s.max_members, s.threshold, s.draws) == (7, (0.2, 0.4), 9, 0.25, 4)


def test_a_bad_eval_or_audit_command_line_is_one_line_and_exit_code_2(capsys, tmp_path):
    from fedrun.config import load_config
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(load_config(None, {"fed.rounds": "1"}).to_toml())
    cases = [
        (["eval"], ("eval:", "RUN_DIR", "usage: fedrun eval")),
        (["eval", "runs/x", "--checkpoint"], ("--checkpoint: missing file name",)),
        (["eval", "--eval.steps", "5", "runs/x"], ("RUN_DIR goes before",)),
        (["eval", str(run), "--eval.stepz", "5"], ("eval.stepz", "known:")),
        (["eval", str(run), "5"], ("5", "--section.key value")),
        (["eval", str(tmp_path / "nowhere")], ("nowhere", "config.toml")),
        (["audit"], ("audit:", "RUN_DIR", "usage: fedrun audit")),
        (["audit", "runs/x", "--samples", "many"], ("--samples", "invalid int value: 'many'")),
        # no abbreviations: --max is not --max-members
        (["audit", "runs/x", "--max", "3"], ("unrecognized arguments: --max", "config key")),
        (["audit", "runs/x", "--levels", "0.1,2"], ("--levels", "(0, 1)")),
        (["audit", "runs/x", "--k", "1"], ("--k >= 2",)),
        (["--config"], ("--config: missing file name",)),
    ]
    for argv, expect in cases:
        assert main(argv) == 2, argv
        line = one_error(capsys)
        assert all(text in line for text in expect), (argv, line)


def test_help_of_a_subcommand_is_the_usage(capsys):
    for argv in (["eval", "--help"], ["audit", "-h"], ["train", "--help"]):
        assert main(argv) == 0
        assert capsys.readouterr().out.strip() == (USAGE + "\n" + methods_help()).strip()
