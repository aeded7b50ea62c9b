"""A training config is a Recipe (what is trained: the run's identity) and a Runtime (where and
how it runs), each validated once, when made."""

from __future__ import annotations

import dataclasses

import pytest

from conftest import toy_stream
from continual import Recipe, Runtime, TrainConfig, make_strategy
from continual.identity import run_identity
from continual.scheduler import task_seed


def test_a_config_is_validated_when_made_and_splits_into_recipe_and_runtime():
    for bad, message in (({"lr": -1.0}, "lr must be a number > 0 and <= 100"), ({"max_steps": 0}, "max_steps must be an integer"),
                         ({"precision": "fp8"}, "precision must be one of"),
                         ({"head_lr": 1e38}, "head_lr must be a number > 0 and <= 100, got 1e"),
                         ({"log_every": 0}, "log_every must be")):
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="malloc must be one of"):
        Runtime(malloc="jemalloc")
    with pytest.raises(ValueError, match="patience must be None"):
        Recipe(patience=0)
    # numpy's own refusal of a negative seed names no setting; torch refuses one past 64 bits
    for seed in (-5, 2**63, True):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 9223372036854775807\]"):
            Recipe(seed=seed)
    # a stream run's seed is held to 32 bits: the per-task seeds derived from it stay in range
    assert task_seed(2**32 - 1, 99) < 2**63
    with pytest.raises(ValueError, match=r"a stream run's seed .* must be an integer in \[0, 4294967295\], got 4294967296"):
        task_seed(2**32, 0)
    config = TrainConfig.of(Recipe(max_steps=7, seed=3), Runtime(bucket=True, precision="auto"))
    assert config.max_steps == 7 and config.bucket and config.recipe() == Recipe(max_steps=7, seed=3)
    assert config.runtime() == Runtime(bucket=True, precision="auto")
    with pytest.raises(ValueError, match="eval_every"):  # a copy with other values is checked too
        dataclasses.replace(config, eval_every=0)


def test_the_run_identity_is_the_recipe_never_the_runtime(text_model):
    stream, model, strategy = toy_stream(), text_model(), make_strategy("per-task", ["lora"])
    plain = run_identity(stream, model, strategy, TrainConfig(max_steps=20))
    fast = run_identity(stream, model, strategy, TrainConfig(max_steps=20, precision="bf16", bucket=True, device="cpu",
                                                             dropout_masks="fast", malloc="hold", progress=False))
    assert fast == plain  # a run may continue on another device, precision or batching
    assert run_identity(stream, model, strategy, TrainConfig(max_steps=21)) != plain
    assert set(plain["train"]) == {f.name for f in dataclasses.fields(Recipe)} - {"seed"}


def test_fast_on_a_cpu_says_it_adds_nothing(capsys):
    """--fast on a CPU changed nothing without a word (its CPU settings are the defaults)."""
    from continual.cli import build_parser
    from continual.cli.commands import train_config

    cpu = train_config(build_parser().parse_args(["run", "--fast", "--device", "cpu"]))
    assert cpu.compile is None and "--fast: on a CPU the fast path's settings are the defaults" in capsys.readouterr().err
    train_config(build_parser().parse_args(["run", "--device", "cpu"]))
    assert capsys.readouterr().err == ""
    explicit = train_config(build_parser().parse_args(["run", "--fast", "--device", "cpu", "--compile", "default"]))
    assert explicit.compile == "default" and capsys.readouterr().err == ""
