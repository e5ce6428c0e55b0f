"""RunConfig / NodeConfig: parsing Flower-style flat mappings, coercion, validation messages, round trips."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import (
    ERR_CHOICE,
    ERR_RANGE,
    ERR_TYPE,
    ERR_UNKNOWN_KEY,
    FAIRNESS_THRESHOLD_KEYS,
    ConfigError,
    NodeConfig,
    RunConfig,
    parse_kv_string,
)
from common.recipes import RECIPES

# --------------------------------------------------------------------------------------------- parsing


def test_defaults_are_valid_and_round_trip():
    cfg = RunConfig()
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    assert NodeConfig.from_mapping(NodeConfig().to_mapping()) == NodeConfig()


def test_flower_keys_map_to_fields():
    cfg = RunConfig.from_mapping({"num-server-rounds": 7, "local-epochs": 2, "train-part": "lora",
                                  "max-update-norm": 3.5, "dp": False})
    assert (cfg.num_server_rounds, cfg.local_epochs, cfg.train_part, cfg.max_update_norm, cfg.dp) == (
        7, 2, "lora", 3.5, False)
    # every field is reachable through its hyphenated key
    mapped = set(RunConfig().to_mapping())
    assert {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)} - {"fairness-thresholds"} <= mapped


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("num-server-rounds", "5", 5),
        ("num-server-rounds", " 5 ", 5),
        ("num-server-rounds", 5.0, 5),
        ("learning-rate", "1e-3", 1e-3),
        ("learning-rate", 2, 2.0),
        ("clipping-norm", "0.5", 0.5),
        ("dp", "false", False),
        ("dp", "True", True),
        ("dp", "yes", True),
        ("dp", "0", False),
        ("dp", 1, True),
        ("labels", 7, "7"),
        ("model", "tiny", "tiny"),
    ],
    ids=repr,
)
def test_strings_and_numbers_are_coerced(key, raw, expected):
    value = RunConfig.from_mapping({key: raw}).to_mapping()[key]
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("key", "raw", "expected"),
    [
        ("num-server-rounds", "three", "an integer"),
        ("num-server-rounds", 2.5, "an integer"),
        ("num-server-rounds", True, "an integer"),
        ("learning-rate", "fast", "a number"),
        ("learning-rate", False, "a number"),
        ("dp", "maybe", "a boolean (true/false)"),
        ("dp", 2, "a boolean (true/false)"),
        ("model", None, "a string"),
    ],
    ids=repr,
)
def test_wrong_types_name_key_expected_and_value(key, raw, expected):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: raw})
    assert str(e.value) == ERR_TYPE.format(key=key, expected=expected, value=raw)


@pytest.mark.parametrize(
    ("key", "raw", "allowed"),
    [
        ("num-server-rounds", 0, ">= 1"),
        ("fraction-train", 0.0, "> 0.0 and <= 1.0"),
        ("fraction-train", 1.5, "> 0.0 and <= 1.0"),
        ("trim-beta", 0.5, ">= 0.0 and < 0.5"),
        ("max-length", 4, ">= 8 and <= 512"),
        ("max-length", 513, ">= 8 and <= 512"),
        ("val-fraction", 1.0, "> 0.0 and < 1.0"),
        ("delta", 1.0, ">= 0.0 and < 1.0"),
        ("clipping-norm", -1.0, ">= 0.0"),
        ("batch-size", -1, ">= 0"),
        ("local-epochs", -1, ">= 0"),
        ("noise-seed", -2, ">= -1"),
        ("seed", -1, ">= 0"),
        ("epsilon", float("nan"), ">= 0.0"),
        ("epsilon", float("inf"), ">= 0.0"),
        ("central-clipping-norm", "-inf", "> 0.0"),
        ("min-group-size", -1, ">= 0"),
    ],
    ids=repr,
)
def test_out_of_range_names_key_range_and_value(key, raw, allowed):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: raw})
    kind = type(RunConfig().to_mapping()[key])
    assert str(e.value) == ERR_RANGE.format(key=key, allowed=allowed, value=kind(raw))


@pytest.mark.parametrize(
    ("key", "raw", "choices"),
    [
        ("aggregation", "mean", "fedavg, fedmedian, trimmed-mean, krum"),
        ("train-part", "all", "auto, full, head, lora, classifier"),
        ("pooling", "max", "auto, cls, mean, mean-layers"),
        ("accountant", "gdp", "prv, rdp"),
        ("device", "gpu", "auto, cpu, cuda, cuda:N"),
    ],
)
def test_choices_are_listed(key, raw, choices):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: raw})
    assert str(e.value) == ERR_CHOICE.format(key=key, choices=choices, value=raw)


def test_empty_model_is_rejected():
    with pytest.raises(ConfigError, match="config key 'model' must be minilm, tiny or a directory"):
        RunConfig.from_mapping({"model": ""})


@pytest.mark.parametrize("key", ["local_epochs", "rounds", "fairness", "Num-Server-Rounds"])
def test_unknown_keys_are_rejected(key):
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: 1})
    names = sorted(f.name.replace("_", "-") for f in dataclasses.fields(RunConfig) if f.name != "fairness_thresholds")
    assert str(e.value) == ERR_UNKNOWN_KEY.format(key=key, valid=", ".join(names) + ", fairness.<threshold>")


def test_unknown_keys_can_be_ignored_explicitly():
    cfg = RunConfig.from_mapping({"typo-key": 1, "seed": 3}, ignore_unknown=True)
    assert cfg.seed == 3


def test_first_bad_value_fails_before_any_work():
    # validation happens at construction, also when built directly rather than parsed
    with pytest.raises(ConfigError, match="'batch-size'"):
        RunConfig(batch_size=-1)


# --------------------------------------------------------------------------------------------- fairness


def test_fairness_thresholds_are_parsed_and_round_trip():
    raw = {"fairness.max-equalized-odds-difference": "0.1", "fairness.min-worst-group-accuracy": 0.7}
    cfg = RunConfig.from_mapping(raw)
    assert cfg.fairness_thresholds == {"max-equalized-odds-difference": 0.1, "min-worst-group-accuracy": 0.7}
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    assert cfg.to_mapping()["fairness.max-equalized-odds-difference"] == 0.1


def test_every_documented_fairness_key_is_accepted():
    cfg = RunConfig.from_mapping({f"fairness.{k}": 0.5 for k in FAIRNESS_THRESHOLD_KEYS})
    assert set(cfg.fairness_thresholds) == set(FAIRNESS_THRESHOLD_KEYS)


def test_unknown_fairness_key_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({"fairness.max-eo": 0.1})
    valid = ", ".join(f"fairness.{k}" for k in FAIRNESS_THRESHOLD_KEYS)
    assert str(e.value) == ERR_UNKNOWN_KEY.format(key="fairness.max-eo", valid=valid)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")], ids=repr)
def test_fairness_threshold_outside_unit_interval(value):
    key = "fairness.min-demographic-parity-ratio"
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({key: value})
    assert str(e.value) == ERR_RANGE.format(key=key, allowed=">= 0.0 and <= 1.0", value=value)


def test_fairness_threshold_must_be_a_number():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({"fairness.max-accuracy-difference": "low"})
    assert str(e.value) == ERR_TYPE.format(key="fairness.max-accuracy-difference", expected="a number", value="low")


# --------------------------------------------------------------------------------------------- round trips


@settings(max_examples=40, deadline=None)
@given(
    rounds=st.integers(1, 1000),
    frac=st.floats(0.0, 1.0, exclude_min=True),
    part=st.sampled_from(["full", "head", "lora"]),
    agg=st.sampled_from(["fedavg", "fedmedian", "trimmed-mean", "krum"]),
    dp=st.booleans(),
    clip=st.floats(1e-6, 1e6),
    labels=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
    thresholds=st.dictionaries(st.sampled_from(FAIRNESS_THRESHOLD_KEYS), st.floats(0.0, 1.0), max_size=3),
)
def test_to_mapping_round_trips(rounds, frac, part, agg, dp, clip, labels, thresholds):
    cfg = RunConfig(num_server_rounds=rounds, fraction_train=frac, train_part=part, aggregation=agg, dp=dp,
                    clipping_norm=clip, labels=labels, fairness_thresholds=thresholds)
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    # and through strings, as a --run-config on the command line gives them
    as_strings = {k: str(v) for k, v in cfg.to_mapping().items()}
    assert RunConfig.from_mapping(as_strings) == cfg


def test_to_json_is_the_mapping():
    import json

    cfg = RunConfig(seed=4, fairness_thresholds={"max-accuracy-difference": 0.2})
    assert json.loads(cfg.to_json()) == cfg.to_mapping()


def test_effective_learning_rate_by_part():
    assert RunConfig(learning_rate=0.3).effective_learning_rate == 0.3
    # without DP: the measured non-private rates; under DP (the default) the DP recipes
    assert RunConfig(train_part="full", dp=False).effective_learning_rate == 1.5e-4
    assert RunConfig(train_part="lora", dp=False).effective_learning_rate == 1e-3
    assert RunConfig(train_part="head", top_k_layers=1).effective_learning_rate == 5e-4
    assert RunConfig(train_part="head").effective_learning_rate == 2e-2
    assert RunConfig(train_part="classifier").effective_learning_rate == RECIPES[("classifier", True)].learning_rate


def test_auto_part_and_recipes_fill_only_what_the_user_left_open():
    dp = RunConfig().resolved()
    r = RECIPES[("classifier", True)]
    assert (dp.train_part, dp.batch_size, dp.local_epochs, dp.learning_rate, dp.clipping_norm) == (
        "classifier", r.batch_size, r.local_epochs, r.learning_rate, r.clipping_norm)
    plain = RunConfig(dp=False).resolved()
    assert plain.train_part == "full" and plain.batch_size == RECIPES[("full", False)].batch_size
    # explicit values win, key by key
    mine = RunConfig(batch_size=7, local_epochs=3, learning_rate=0.5, clipping_norm=2.0, train_part="lora").resolved()
    assert (mine.train_part, mine.batch_size, mine.local_epochs, mine.learning_rate, mine.clipping_norm) == (
        "lora", 7, 3, 0.5, 2.0)
    assert RunConfig(batch_size=7).resolved().local_epochs == r.local_epochs
    assert dp.resolved() == dp  # idempotent: the node resolving what the server resolved changes nothing
    # every concrete value is valid as an explicit one
    for (part, private), rec in RECIPES.items():
        assert rec.batch_size >= 1 and rec.local_epochs >= 1 and rec.learning_rate > 0 and rec.clipping_norm > 0
        assert RunConfig(train_part=part.split("+")[0], dp=private, top_k_layers=int("+" in part)).resolved()


def test_every_run_config_key_has_a_pyproject_default():
    import tomllib
    from pathlib import Path

    table = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(RunConfig().to_mapping()) <= set(table)
    assert RunConfig.from_mapping(table).resolved() == RunConfig(out=table["out"]).resolved()


def test_label_names():
    assert RunConfig(labels=" neg, pos ,").label_names == ["neg", "pos"]
    assert RunConfig().label_names == []


# --------------------------------------------------------------------------------------------- kv strings


def test_parse_kv_string_with_quotes():
    assert parse_kv_string("num-server-rounds=3 labels='neg,pos' out=\"runs/a b\" eval-data=") == {
        "num-server-rounds": "3", "labels": "neg,pos", "out": "runs/a b", "eval-data": ""}
    # a value may itself contain "="
    assert parse_kv_string("out=a=b") == {"out": "a=b"}
    assert parse_kv_string("") == {}


def test_parse_kv_string_feeds_from_mapping():
    cfg = RunConfig.from_mapping(parse_kv_string("local-epochs=2 dp=false learning-rate=1e-4"))
    assert (cfg.local_epochs, cfg.dp, cfg.learning_rate) == (2, False, 1e-4)


@pytest.mark.parametrize("text", ["rounds", "a=1 b", "labels='neg,pos"])
def test_parse_kv_string_errors_are_config_errors(text):
    with pytest.raises(ConfigError, match="run config"):
        parse_kv_string(text)


# --------------------------------------------------------------------------------------------- node config


def test_node_config_parses_and_ignores_flower_keys():
    cfg = NodeConfig.from_mapping({"partition-id": 0, "num-partitions": 3, "node-name": "clinic-a",
                                   "epsilon": "4", "delta": "1e-6", "require-encryption": "true"})
    assert (cfg.node_name, cfg.epsilon, cfg.delta, cfg.require_encryption) == ("clinic-a", 4.0, 1e-6, True)
    assert NodeConfig.from_mapping(cfg.to_mapping()) == cfg


@pytest.mark.parametrize(
    ("key", "raw", "allowed"),
    [
        ("epsilon", 0, "> 0.0"),
        ("epsilon", "inf", "> 0.0"),
        ("delta", 0, "> 0.0 and < 1.0"),
        ("delta", 1, "> 0.0 and < 1.0"),
        ("count-noise-epsilon", -1, ">= 0.0"),
        # an infinite ε would release exact counts labelled as noised ones
        ("count-noise-epsilon", "inf", ">= 0.0"),
        ("count-noise-epsilon", "nan", ">= 0.0"),
    ],
)
def test_node_config_ranges(key, raw, allowed):
    with pytest.raises(ConfigError) as e:
        NodeConfig.from_mapping({key: raw})
    assert str(e.value) == ERR_RANGE.format(key=key, allowed=allowed, value=float(raw))


@pytest.mark.parametrize(("budget", "per_round"), [(8.0, 0.1), (16.0, 0.1), (3.0, 3.0 / 80), (1.0, 1.0 / 80)])
def test_node_count_noise_epsilon_defaults_to_a_capped_share_of_the_budget(budget, per_round):
    """By default a round's noised counts cost 1/80 of the node's budget, at most 0.1: a small budget is not
    eaten by its evaluation statistics (at ε=1 a flat 0.1 a round took 30 % of it over 3 rounds)."""
    node = NodeConfig.from_mapping({"epsilon": budget})
    assert node.count_noise_epsilon == "auto"
    assert node.count_epsilon_per_round == pytest.approx(per_round)
    assert NodeConfig.from_mapping({"epsilon": budget, "count-noise-epsilon": "auto"}) == node


@pytest.mark.parametrize("raw", [0.25, "0.25", 0, "0"])
def test_node_count_noise_epsilon_set_by_the_institution_is_used_as_it_is(raw):
    node = NodeConfig.from_mapping({"epsilon": 1.0, "count-noise-epsilon": raw})
    assert node.count_epsilon_per_round == float(raw)
    assert NodeConfig.from_mapping(node.to_mapping()) == node


def test_node_count_noise_epsilon_rejects_words_other_than_auto():
    with pytest.raises(ConfigError) as e:
        NodeConfig.from_mapping({"count-noise-epsilon": "lots"})
    assert str(e.value) == ERR_TYPE.format(key="count-noise-epsilon", expected="'auto' or a number >= 0",
                                           value="lots")


def test_node_config_rejects_unknown_keys_and_bad_device():
    with pytest.raises(ConfigError, match="data-pth"):
        NodeConfig.from_mapping({"data-pth": "x.csv"})
    with pytest.raises(ConfigError) as e:
        NodeConfig.from_mapping({"device": "gpu"})
    assert str(e.value) == ERR_CHOICE.format(key="device", choices="auto, cpu, cuda, cuda:N", value="gpu")
    assert NodeConfig.from_mapping({"device": "cuda:1"}).device == "cuda:1"


def test_node_config_key_file_and_passphrase_are_exclusive():
    with pytest.raises(ConfigError, match="set exactly one"):
        NodeConfig(key_file="k", passphrase_env="P")


def test_node_state_dir(tmp_path):
    assert NodeConfig(state_dir=str(tmp_path)).resolved_state_dir("x") == tmp_path
    assert NodeConfig(node_name="a").resolved_state_dir("x").name == "a"
    assert NodeConfig().resolved_state_dir("node-3").name == "node-3"
