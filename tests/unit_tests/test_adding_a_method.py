"""A method is one class: a new server rule and a new compressor, written in this file alone,
register themselves with their keys and checks, train end to end, and appear in ``--help``, in the
config reference and in a bad-input error. Nothing else in fedrun knows them.

They are registered by a fixture (and removed after), so that no other test sees them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from fedrun import models
from fedrun.__main__ import main
from fedrun.config import HASHED_WHEN_SET, ConfigError, load_config, setting
from fedrun.config_reference import reference_markdown
from fedrun.federated.compression import COMPRESSORS, Compressor, CompressSettings
from fedrun.federated.server import SERVER_RULES, ServerOptimizer
from fedrun.flat import flatten
from fedrun.registry import Settings
from fedrun.train import train

from helpers import model_at, tiny_overrides

# ------------------------------------------------------------------ the new server rule


@dataclass
class PartwaySettings(Settings):
    partway_share: float = setting(0.5, hashed=HASHED_WHEN_SET)
    """FedPartway: the share of the way from the global model to the clients' average moved."""

    def validate(self) -> None:
        if not 0 < self.partway_share <= 1:
            raise ConfigError(f"fed.partway_share: must be in (0, 1], got {self.partway_share}")


class FedPartway(ServerOptimizer):
    """Moves the global model part of the way to the clients' average: x + share (average - x)."""

    def __init__(self, share: float = 0.5):
        super().__init__()
        self.share = share

    @classmethod
    def from_settings(cls, settings: PartwaySettings) -> FedPartway:
        return cls(settings.partway_share)

    def step(self, global_flat: torch.Tensor, average: torch.Tensor) -> torch.Tensor:
        return global_flat + self.share * (average - global_flat)


# ------------------------------------------------------------------ the new compressor


class HeadOnly(Compressor):
    """Sends the first half of the update's entries (fp32) and drops the rest."""

    name = "head_only"

    def apply(self, x: torch.Tensor, sizes: Sequence[int], gen: torch.Generator | None) -> torch.Tensor:
        out = torch.zeros_like(x)
        half = math.ceil(x.numel() / 2)
        out[:half] = x[:half]
        return out

    def message_bytes(self, sizes: Sequence[int]) -> int:
        return 4 * math.ceil(sum(sizes) / 2)


@pytest.fixture
def new_methods():
    SERVER_RULES.register("fedpartway", PartwaySettings)(FedPartway)
    COMPRESSORS.register("head_only", CompressSettings)(HeadOnly)  # fed.error_feedback, as every compressor
    yield
    SERVER_RULES.unregister("fedpartway")
    COMPRESSORS.unregister("head_only")


def test_a_new_server_rule_and_compressor_train_end_to_end(new_methods, tmp_path):
    over = {"fed__rounds": 1}
    plain = load_config(None, tiny_overrides(tmp_path, "plain", **over))
    partway = load_config(None, tiny_overrides(tmp_path, "partway", fed__server_opt="fedpartway",
                                               fed__partway_share=0.25, **over))
    head = load_config(None, tiny_overrides(tmp_path, "head", fed__compress="head_only",
                                            fed__error_feedback="false", **over))
    for cfg in (plain, partway, head):
        train(cfg)
    start = flatten(models.build(plain, 10, torch.device("cpu"))[0])  # round 0: the seeded init
    average = torch.cat([t.reshape(-1) for t in model_at(plain.run_dir, 1).values()])  # FedAvg's step
    moved = torch.cat([t.reshape(-1) for t in model_at(partway.run_dir, 1).values()])
    # the exact sum makes the partway run's average the plain run's, bit for bit
    assert torch.equal(moved, start + 0.25 * (average - start))
    # the head-only compressor: the second half of the flat model did not move at all
    headed = flatten_state(model_at(head.run_dir, 1))
    half = math.ceil(start.numel() / 2)
    assert torch.equal(headed[half:], start[half:]) and not torch.equal(headed[:half], start[:half])
    summary = (head.run_dir / "summary.json").read_text()
    assert f'"bytes_up_per_client": {4 * half}' in summary


def flatten_state(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in state.values()])


def test_the_new_methods_are_in_help_reference_and_errors(new_methods, capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "fedpartway" in text and "--fed.partway_share" in text and "head_only" in text
    assert "Moves the global model part of the way" in text
    assert "`fed.partway_share` | `0.5` | FedPartway: the share" in reference_markdown()
    assert main(["--fed.server_opt", "fedpartway", "--fed.partway_share", "2"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "fedrun: error: fed.partway_share: must be in (0, 1], got 2.0"
    assert main(["--fed.compress", "head_onyl"]) == 2
    err = capsys.readouterr().err
    assert "fed.compress: got 'head_onyl'; choose one of none, bf16, int8, topk, sign, head_only" in err
    # a new key is hashed only when set: the default config keeps its hash while the method exists
    assert load_config(None, {}).hash() == "975b9e15ea781c37"


def test_without_the_fixture_the_methods_are_unknown():
    with pytest.raises(ConfigError, match=r"^fed\.server_opt: got 'fedpartway'"):
        load_config(None, {"fed.server_opt": "fedpartway"})


def test_a_key_belongs_to_one_method_family():
    """A compressor that declared fed.server_lr (a server rule's key) is refused where it registers,
    and leaves the registry as it was; so is a second choice of the same name."""

    @dataclass
    class Clash(CompressSettings):
        server_lr: float = 1.0
        """Clash: a key of another family."""

    before = COMPRESSORS.names()
    with pytest.raises(ValueError, match=r"^fed\.server_lr: a key of fed\.server_opt already"):
        COMPRESSORS.register("clash", Clash)(HeadOnly)
    with pytest.raises(ValueError, match="registered already"):
        COMPRESSORS.register("int8", CompressSettings)(HeadOnly)
    assert COMPRESSORS.names() == before and load_config(None, {}).hash() == "975b9e15ea781c37"
