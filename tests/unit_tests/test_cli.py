"""The command line, in-process through fedrun.__main__.main (what `python -m fedrun` calls)."""

from fedrun.__main__ import USAGE, main


def test_help_prints_usage_and_exits_0(capsys):
    for argv in (["--help"], ["-h"], ["help"]):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.strip() == USAGE.strip()
        assert "torchrun --nproc_per_node" in out and "--section.key" in out


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
