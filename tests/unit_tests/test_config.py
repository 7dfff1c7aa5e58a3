import pytest

from fedrun.config import Config, ConfigError, config_from_dict, load_config, parse_overrides


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
