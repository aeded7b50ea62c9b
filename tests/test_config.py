import json

import pytest

import adapters
from adapters import ConfigError, UnknownMethodError, make_config


def test_every_method_registered():
    assert set(adapters.available_methods()) >= {
        "bottleneck", "parallel", "compacter", "lora", "prefix", "prompt", "bitfit", "last_layer", "selective"
    }


def test_unknown_method_lists_known_ones():
    with pytest.raises(UnknownMethodError) as e:
        make_config("lorra")
    msg = str(e.value)
    assert "lorra" in msg and "lora" in msg and "bottleneck" in msg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rnak'\].*rank"):
        make_config({"method": "lora", "rnak": 4})


@pytest.mark.parametrize(
    "bad",
    [{"rank": "8"}, {"rank": 8.5}, {"alpha": "x"}, {"targets": "query"}, {"dropout": True}, {"layers": [0, "1"]}],
)
def test_wrong_types_rejected(bad):
    with pytest.raises(ConfigError, match="must be"):
        make_config({"method": "lora", **bad})


def test_value_ranges_checked():
    with pytest.raises(ConfigError, match="rank"):
        make_config("lora", rank=0)
    # a zero scale: the delta trained and changed nothing, and the run printed head-only numbers
    with pytest.raises(ConfigError, match="alpha 0 scales the LoRA update to zero"):
        make_config("lora", alpha=0)
    with pytest.raises(ConfigError, match="scaling 0 multiplies"):
        make_config("parallel", scaling=0.0)
    assert make_config("lora", alpha=-8).alpha == -8  # a sign is learned away: allowed, as PEFT does
    with pytest.raises(ConfigError, match="divisible"):
        make_config("compacter", bottleneck_dim=10, phm_dim=4)
    with pytest.raises(ConfigError, match="patterns"):
        make_config("selective")
    with pytest.raises(ConfigError, match="one of"):
        make_config("prompt", init="zeros")
    # a malformed regex was a bare re.error (a traceback on the command line) when attached
    with pytest.raises(ConfigError, match=r"bitfit: patterns entry '\[x' is not a regular expression"):
        make_config("bitfit", patterns=["[x"])
    with pytest.raises(ConfigError, match="selective: exclude entry"):
        make_config("selective", patterns=["attention"], exclude=["(x"])


def test_negative_layer_indices_count_from_the_end_and_stay_in_range():
    """-1 is the last block; -5 of a 2-block model had wrapped (i % n) to block 1 without a word."""
    from conftest import tiny_backbone

    from adapters import TargetError

    model = adapters.DeltaModel(tiny_backbone("bert"))
    last = model.add_task("a", [{"method": "lora", "layers": [-1]}], num_labels=2)
    assert {s.output.split(".")[2] for s in last.deltas["lora"].sites} == {"1"}
    with pytest.raises(TargetError, match=r"layer indices \[-5\] out of range: the backbone has 2 layers \(indices -2 to 1\)"):
        model.add_task("b", [{"method": "lora", "layers": [-5]}], num_labels=2)


def test_add_task_reads_method_specs_as_the_command_line_does():
    """``add_task("x", "lora:rank=2")`` was "unknown delta method 'lora:rank=2'"."""
    from conftest import tiny_backbone

    model = adapters.DeltaModel(tiny_backbone("bert"))
    assert model.add_task("a", "lora:rank=2", num_labels=2).configs == (make_config("lora", rank=2),)
    both = model.add_task("b", "lora:rank=2+bitfit", num_labels=2)
    assert [c.method for c in both.configs] == ["lora", "bitfit"] and both.configs[0].rank == 2
    assert model.add_task("c", ["lora:alpha=4", {"method": "bitfit"}], num_labels=2).configs[0].alpha == 4
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rnk'\] for method 'lora'"):
        model.add_task("d", "lora:rnk=2", num_labels=2)
    assert "d" not in model.tasks


def test_method_mismatch_rejected():
    cls = adapters.get_method("lora").config_class
    with pytest.raises(ConfigError, match="not 'prefix'"):
        cls.from_dict({"method": "prefix"})


@pytest.mark.parametrize("method", adapters.available_methods())
def test_round_trip_through_json(method):
    from conftest import method_config

    config = make_config(method_config(method))
    again = make_config(json.loads(json.dumps(config.to_dict())))
    assert again == config and hash(again) == hash(config)


def test_configs_are_frozen_and_replace_validates():
    c = make_config("lora")
    with pytest.raises(Exception):
        c.rank = 4  # type: ignore[misc]
    assert c.replace(rank=4).rank == 4
    with pytest.raises(ConfigError):
        c.replace(rank=-1)


def test_defaults_follow_the_survey():
    assert make_config("lora").rank == 8 and make_config("lora").targets == ("query", "value")
    assert make_config("prefix").num_tokens == 5
    assert make_config("prompt").num_tokens == 100
    b = make_config("bottleneck")
    assert b.bottleneck_dim == 64 and b.activation == "silu" and b.targets == ("attn_out", "ffn_out")


def test_options_with_an_exponent_are_numbers():
    """PyYAML reads 1e-3 as text (YAML 1.1 floats need a dot), so lora:alpha=1e1 or
    ewc_lambda=1e4 were refused as strings; a word that only looks close stays text."""
    from adapters.spec import parse_method, parse_options

    assert parse_method("lora:alpha=1e1,dropout=1e-1").alpha == 10.0
    opts = parse_options("a=2.5E-3,b=[1e2,x],c=e5,d=1e,e=nan")
    assert opts == {"a": 0.0025, "b": [100.0, "x"], "c": "e5", "d": "1e", "e": "nan"}
    with pytest.raises(ConfigError, match="finite number"):
        parse_method("lora:alpha=nan")
