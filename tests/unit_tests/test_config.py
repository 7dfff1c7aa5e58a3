"""Config: TOML and overrides, the hash that decides resumes, the facts on the fields, validation."""

import re
import typing

import pytest

from fedrun.config import Config, ConfigError, config_from_dict, load_config, parse_overrides
from fedrun.registry import registered_keys

from helpers import ROOT


def test_defaults_are_the_authors_settings():
    cfg = Config()
    f = cfg.fed
    assert (f.rounds, f.local_epochs, f.num_clients, f.clients_per_round) == (300, 5, 10, 10)
    assert cfg.fed.alpha == 0.5 and cfg.optim.lr == 2e-4 and cfg.optim.batch_size == 512
    assert cfg.data.image_size == 32 and cfg.run.seed == 0 and cfg.train.precision == "auto"


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text('[fed]\nrounds = 7\nalpha = 0.1\n[model]\nchannel_mults = [1, 2]\n'
                    '[data]\nimage_size = 16\n')
    overrides = parse_overrides(["--fed.rounds", "3", "--optim.lr=1e-3", "--data.hflip", "false"])
    cfg = load_config(path, overrides)
    assert cfg.fed.rounds == 3 and cfg.fed.alpha == 0.1 and cfg.optim.lr == 1e-3
    assert cfg.model.channel_mults == [1, 2] and cfg.data.hflip is False


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, {"fed.rounds": "4", "model.attention_levels": "[1, 2]", "run.name": "a b"})
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml())
    again = load_config(path)
    assert again == cfg and again.hash() == cfg.hash()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_hash_ignores_rounds_but_not_training_settings():
    base = load_config(None, {})
    assert load_config(None, {"fed.rounds": "5"}).hash() == base.hash()
    assert load_config(None, {"fed.alpha": "0.1"}).hash() != base.hash()


@pytest.mark.parametrize("overrides, key", [
    ({"fed.roundz": "3"}, "fed.roundz"),
    ({"feds.rounds": "3"}, "feds.rounds"),
    ({"fed.rounds": "three"}, "fed.rounds"),
    ({"fed.rounds": "-1"}, "fed.rounds"),
    ({"fed.alpha": "0"}, "fed.alpha"),
    ({"fed.clients_per_round": "11"}, "fed.clients_per_round"),
    ({"optim.lr": "nan"}, "optim.lr"),
    ({"data.image_size": "36"}, "data.image_size"),
    ({"data.name": "imagenet"}, "data.name"),
    ({"data.hflip": "maybe"}, "data.hflip"),
    ({"model.channel_mults": "1,x"}, "model.channel_mults[1]"),
    ({"run.mode": "fedprox"}, "run.mode"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value).startswith(key + ":")


def test_wrong_toml_type_names_the_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[fed]\nrounds = "3"\n')
    with pytest.raises(ConfigError, match=r"^fed\.rounds: expected an integer"):
        load_config(path)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--fed.rounds"])
    with pytest.raises(ConfigError, match="--section.key value"):
        parse_overrides(["fed.rounds", "3"])


# Computed from fedrun/config.py before its keys carried their own facts (field metadata):
# every run dir written since must keep resuming, so these values never change.
@pytest.mark.parametrize("path, overrides, expected", [
    (None, {}, "975b9e15ea781c37"),
    ("configs/digits_converged/digits.toml", {}, "33c94899e3b6ab7f"),  # the default before embed 16
    (None, {"ema.sigma_rel": "0.1"}, "4afe20cf3ad37fcd"),
    # privacy run dirs of those days hold privacy.accountant = "rdp" in their config.toml (every key
    # is written out): "prv" became the default later and counts only when another value is set
    (None, {"privacy.level": "sample", "privacy.noise_multiplier": "2.0", "privacy.accountant": "rdp"},
     "e2b42ba4cff52960"),
    (None, {"privacy.level": "client", "privacy.accountant": "rdp"}, "1573773ef6a5b3a2"),
    (None, {"fed.drift": "fedprox", "fed.prox_mu": "0.1"}, "003b0f31a4bdd8ff"),
    (None, {"fed.drift": "scaffold"}, "8f998da6aaa2845d"),
    (None, {"fed.client_optimizer": "keep"}, "0af0e0963da7d331"),
    (None, {"optim.lr_schedule": "cosine"}, "ff66abc7fd84de50"),
    (None, {"model.label_dropout": "0.1", "diffusion.guidance": "2.0"}, "9632473466218566"),
    # rounds, evaluation, checkpointing (and the keys added since: off by default) are not hashed
    (None, {"fed.rounds": "7", "eval.enabled": "true", "checkpoint.every": "3"}, "975b9e15ea781c37"),
    (None, {"run.tensorboard": "true", "fed.feddyn_alpha": "0.01"}, "975b9e15ea781c37"),
    # the init's checksum, not its path, is part of a run's identity (checkpoints hold it)
    (None, {"model.init_from": "runs/digits_public"}, "975b9e15ea781c37"),
])
def test_hash_values_of_existing_run_dirs_never_change(path, overrides, expected):
    assert load_config(ROOT / path if path else None, overrides).hash() == expected


def test_keys_added_later_count_in_the_hash_only_when_set():
    base = load_config(None, {}).hash()
    dyn = load_config(None, {"fed.drift": "feddyn"}).hash()
    assert dyn != base and load_config(None, {"fed.drift": "feddyn", "fed.feddyn_alpha": "0.1"}).hash() != dyn
    assert load_config(None, {"fed.feddyn_alpha": "0.1"}).hash() != base  # set: it counts
    # a section counted as a whole: one key away from the default brings all of its keys in ...
    dp = load_config(None, {"privacy.level": "sample"}).hash()
    assert dp != base and load_config(None, {"privacy.level": "sample", "privacy.clip": "2.0"}).hash() != dp
    # ... where it applies: without privacy its keys (and changes of their defaults) count for nothing
    assert load_config(None, {"privacy.clip": "2.0", "privacy.accountant": "rdp"}).hash() == base


def test_every_key_has_a_docstring_and_consistent_facts():
    """Each field documents itself (torchtitan style: the string under it), and its facts are
    among the known values; the hash and the report read nothing else."""
    import ast
    import inspect
    from dataclasses import fields

    from fedrun import config as C

    for section, cls in typing.get_type_hints(Config).items():
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        documented = {node.target.id for node, after in zip(body, body[1:], strict=False)
                      if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr)
                      and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)}
        assert {f.name for f in fields(cls)} == documented, section
    for key in registered_keys():  # the methods' keys document themselves the same way
        assert key.doc.strip(), key.dotted
    for key in C.all_keys():
        facts = C.key_facts(key)
        assert facts.hashed in (C.HASHED, C.HASHED_WHEN_SET, C.NOT_HASHED), key
        if facts.choices is not None:
            assert C.default_of(key) in facts.choices, key
        if facts.off is not C.NO_OFF and facts.choices is not None:
            assert facts.off in facts.choices, key
        for clause_key, values, _ in facts.applies.clauses:
            assert clause_key in C.all_keys() and all(v in (C.key_facts(clause_key).choices or values)
                                                      for v in values), key
    assert C.choices_of("fed.drift") == ("none", "fedprox", "scaffold", "feddyn")


def test_feddyn_keys_and_rules():
    cfg = load_config(None, {"fed.drift": "feddyn", "fed.feddyn_alpha": "0.05"})
    assert cfg.fed.drift == "feddyn" and cfg.fed.feddyn_alpha == 0.05 and Config().fed.feddyn_alpha == 0.01
    for overrides, key, text in [
        ({"fed.feddyn_alpha": "0"}, "fed.feddyn_alpha", "> 0"),
        ({"fed.drift": "feddyn", "train.precision": "fp16"}, "train.precision", "FedDyn"),
        ({"fed.drift": "feddyn", "train.clients_at_once": "2"}, "train.clients_at_once", "= 1"),
        ({"fed.drift": "feddyn", "privacy.level": "client"}, "fed.drift", "DP-FedAvg"),
        ({"fed.drift": "feddyn", "run.mode": "centralized"}, "fed.drift", "centralized"),
    ]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: .*{re.escape(text)}"):
            load_config(None, overrides)
    # sample-level DP keeps each client's FedDyn state on the client: allowed
    assert load_config(None, {"fed.drift": "feddyn", "privacy.level": "sample"}).privacy.level == "sample"


def test_each_section_validates_itself_and_each_method_checks_the_config_it_is_chosen_in():
    from fedrun import config as C
    from fedrun.federated.drift import ScaffoldRule

    fed = C.FedConfig(alpha=-1.0)
    with pytest.raises(ConfigError, match=r"^fed\.alpha: "):
        fed.validate()
    with pytest.raises(ConfigError, match=r"^fed\.drift: got 'fedsgd'; choose one of none, fedprox, "):
        load_config(None, {"fed.drift": "fedsgd"})
    with pytest.raises(ConfigError, match=r"^optim\.lr: must be a finite number"):
        C.OptimConfig(lr=float("nan")).validate()
    cfg = Config()
    cfg.fed.drift, cfg.train.precision = "scaffold", "fp16"
    for name in typing.get_type_hints(Config):
        getattr(cfg, name).validate()  # every section alone is fine: the combination is not
    with pytest.raises(ConfigError, match=r"^train\.precision: SCAFFOLD"):
        ScaffoldRule.check(cfg)  # the rule lives with the method
    with pytest.raises(ConfigError, match=r"^train\.precision: SCAFFOLD"):
        C.validate(cfg)
    assert [rule.key for rule in C.CROSS_SECTION_RULES] == ["data.image_size", "diffusion.guidance"]
