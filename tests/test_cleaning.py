"""Text cleaning (run-config ``clean``): each rule, idempotence, dedup alignment, config errors, and the counts'
way from a node's train reply into RUN_DIR/cleaning.json (server loop driven directly, no Ray)."""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.cleaning import (
    ERR_NOTHING_LEFT,
    ERR_UNKNOWN_RULE,
    MASK_EMAIL,
    MASK_URL,
    MASK_USER,
    RULES,
    CleaningConfig,
    clean_dataset,
    clean_text,
    counts_to_metrics,
    fix_unicode,
    fix_whitespace,
    split_cleaning_metrics,
)
from common.config import ConfigError, RunConfig
from common.data import DataError, Schema, TextDataset, load_dataset, write_dataset

ALL = CleaningConfig.from_spec("all")
LABELS = ["negative", "positive"]
ROOT = Path(__file__).resolve().parents[1]


def only(rule: str) -> CleaningConfig:
    return CleaningConfig.from_spec(rule)


def dataset(texts: list[str], labels: list[int], groups: list[str] | None = None) -> TextDataset:
    return TextDataset(texts=list(texts), labels=np.asarray(labels, dtype=np.int64), label_names=LABELS,
                       groups=groups, source="mem.jsonl")


# --------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("spec", "rules"),
    [("", ()), ("   ", ()), ("all", RULES), ("ALL", RULES), ("urls", ("urls",)),
     (" Emails , urls,, ", ("urls", "emails")), ("dedup,all", RULES)],
    ids=repr,
)
def test_spec_parsing(spec, rules):
    cfg = CleaningConfig.from_spec(spec)
    assert cfg.rules == rules
    assert cfg.enabled == bool(rules)
    assert CleaningConfig.from_spec(cfg.spec) == cfg


def test_unknown_rules_are_all_named_with_the_valid_ones():
    expected = ERR_UNKNOWN_RULE.format(rules="'url', 'stopwords'", valid=", ".join(RULES))
    assert "valid rules: unicode, whitespace, urls, emails, handles, dedup, or 'all'" in expected
    with pytest.raises(ValueError) as e:
        CleaningConfig.from_spec("url, stopwords,emails")
    assert str(e.value) == expected


def test_run_config_key_clean_is_validated_and_round_trips():
    assert RunConfig().clean == ""
    cfg = RunConfig.from_mapping({"clean": "unicode,dedup"})
    assert cfg.clean == "unicode,dedup"
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    with pytest.raises(ConfigError) as e:
        RunConfig.from_mapping({"clean": "urls,punctuation"})
    assert str(e.value) == ERR_UNKNOWN_RULE.format(rules="'punctuation'", valid=", ".join(RULES))


def test_clean_is_declared_with_its_default_for_flwr_run():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared["clean"] == RunConfig().clean == ""


def _simulate_args(*argv: str) -> argparse.Namespace:
    from fedpriv import cmd_simulate

    parser = argparse.ArgumentParser()
    cmd_simulate.register(parser.add_subparsers())
    return parser.parse_args(["simulate", *argv])


def test_simulate_flag_sets_the_key():
    from fedpriv.cmd_simulate import build_config

    assert build_config(_simulate_args("--clean", "whitespace,urls", "--out", "x")).clean == "whitespace,urls"
    assert build_config(_simulate_args("--out", "x")).clean == ""


def test_simulate_rejects_an_unknown_rule_before_any_work(capsys, tmp_path):
    args = _simulate_args("--clean", "lowercase", "--out", str(tmp_path / "run"))
    assert args.func(args) == 2
    err = capsys.readouterr().err
    # the message names the flag, then the config key's own text
    message = ERR_UNKNOWN_RULE.format(rules="'lowercase'", valid=", ".join(RULES))
    assert err == "fedpriv simulate: --clean (" + message.replace("config key 'clean': ", "config key 'clean'): ") + "\n"
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------- unicode


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [
        ("cafe\u0301", "café"),  # NFC: e + combining acute -> é
        ("cafÃ©", "café"),  # UTF-8 read as cp1252 / latin-1 (same characters here)
        ("Itâ€™s â€œfineâ€", "It’s “fineâ€"),  # cp1252 images; a cut-off sequence stays as it is
        ("Itâ\x80\x99s", "It’s"),  # the same bytes read as latin-1 (C1 control characters)
        ("â€œquotedâ€\x9d", "“quoted”"),  # 0x9D is undefined in cp1252; lenient decoders keep U+009D
        ("ÃƒÂ©tÃƒÂ©", "été"),  # encoded twice
        ("Ã© next to 日本 and 😀", "é next to 日本 and 😀"),  # repaired in place, other text untouched
        ("Ã\u00a0 la carte", "à la carte"),
    ],
    ids=repr,
)
def test_unicode_repairs_mojibake_and_normalises(raw, fixed):
    assert fix_unicode(raw) == fixed
    assert clean_text(raw, config=only("unicode")) == fixed


@pytest.mark.parametrize(
    "text",
    ["naïve café in São Paulo", "Straße, Øre, Ægir, æøå", "Ã alone", "ÂÃ", "price: 5 € — ok", "plain ascii",
     "Ðo: a lead byte image, then no continuation", "日本語のテキスト"],
    ids=repr,
)
def test_unicode_leaves_correct_text_alone(text):
    assert fix_unicode(text) == text


def test_unicode_keeps_a_sequence_that_is_not_valid_utf8():
    overlong = "\u00e0\u0080\u0080"  # E0 80 80: an overlong form, so not UTF-8 that was misread
    assert fix_unicode(f"x{overlong}y") == f"x{overlong}y"


# --------------------------------------------------------------------------------------------- whitespace


@pytest.mark.parametrize(
    ("raw", "fixed"),
    [
        ("  two\t\tspaces \n and\r\nlines  ", "two spaces and lines"),
        ("no\u00a0break\u2003em\u3000ideographic", "no break em ideographic"),
        ("zero\u200bwidth\u2060joiner\ufeffbom\u00adsoft", "zerowidthjoinerbomsoft"),
        ("bidi \u202eevil\u202c \u200emark", "bidi evil mark"),
        ("ctrl\x00\x07\x1b\x7f\x9fchars", "ctrlchars"),
        ("sep\x1cand\x85next", "sep and next"),  # whitespace controls become one space
        ("emoji 👩\u200d💻 and \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "emoji 👩\u200d💻 and "
         "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"),  # ZWJ / ZWNJ carry meaning: kept
    ],
    ids=repr,
)
def test_whitespace(raw, fixed):
    assert fix_whitespace(raw) == fixed
    assert clean_text(raw, config=only("whitespace")) == fixed


def test_whitespace_keeps_punctuation_and_case():
    text = "Don't STOP: commas, (brackets) & stop-words!?"
    assert clean_text(text, config=ALL) == text


# --------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("see https://example.org/a?b=1&c=2.", f"see {MASK_URL}."),
        ("(http://x.example/path_(1))", f"({MASK_URL}))"),
        ("WWW.Example.COM/page, then", f"{MASK_URL}, then"),
        ("get ftp://files.example.net/x.tgz", f"get {MASK_URL}"),
        ("http://user@host.example/p", MASK_URL),  # an @ inside a URL is part of the URL
        ("two: http://a.example http://b.example", f"two: {MASK_URL} {MASK_URL}"),
        ("bare example.com and http:// stay", "bare example.com and http:// stay"),
    ],
    ids=repr,
)
def test_urls(raw, masked):
    assert clean_text(raw, config=only("urls")) == masked


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("write to first.last+tag@mail.example.co.uk today.", f"write to {MASK_EMAIL} today."),
        ("<jo_99@x.org>, ann@y.io", f"<{MASK_EMAIL}>, {MASK_EMAIL}"),
        ("www.shop@example.org", MASK_EMAIL),  # a local part that starts like a URL is still an address
        ("no domain: bob@localhost", "no domain: bob@localhost"),
    ],
    ids=repr,
)
def test_emails(raw, masked):
    assert clean_text(raw, config=only("emails")) == masked


@pytest.mark.parametrize(
    ("raw", "masked"),
    [
        ("@alice thanks (@bob_99)!", f"{MASK_USER} thanks ({MASK_USER})!"),
        ("RT @nhs: clinic closed", f"RT {MASK_USER}: clinic closed"),
        ("bob@example.org is mail, not a handle", "bob@example.org is mail, not a handle"),
        ("meet @ 5pm", "meet @ 5pm"),
    ],
    ids=repr,
)
def test_handles(raw, masked):
    assert clean_text(raw, config=only("handles")) == masked


def test_emails_are_masked_before_handles():
    text = "@carol: mail carol@clinic.example or @dave"
    assert clean_text(text, config=CleaningConfig.from_spec("emails,handles")) == (
        f"{MASK_USER}: mail {MASK_EMAIL} or {MASK_USER}")


@pytest.mark.parametrize("rule", RULES)
def test_a_rule_that_is_off_changes_nothing_of_its_own(rule):
    text = "cafÃ©  \u200b https://x.example a@b.example @user"
    others = CleaningConfig.from_spec(",".join(r for r in RULES if r != rule))
    target = {"unicode": "Ã©", "whitespace": "\u200b", "urls": "https://x.example", "emails": "a@b.example",
              "handles": "@user", "dedup": ""}[rule]
    assert target in clean_text(text, config=others)


# --------------------------------------------------------------------------------------------- idempotence

FRAGMENTS = [
    "a", "Z", "é", "ï", " ", "  ", "\t", "\n", "\u00a0", "\u200b", "\u200d", "\u00ad", "\ufeff", "\x00", "\x85",
    "\u0301", "\u0303", "\u0958", "Ã", "Â", "â", "ð", "à", "©", "€", "™", "ƒ", "Ÿ", "¿", "\x80", "\x81", "\x9d",
    "\x9f", "@", ".", ":", "/", "[", "]", "(", ")", "http://", "www.", "x@y.org", "@bob", "’", "日",
    "😀",
]
TEXTS = st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join) | st.text(max_size=40)
SPECS = st.sampled_from(["all", *RULES, "unicode,whitespace", "urls,emails,handles", "unicode,handles"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXTS, spec=SPECS)
def test_clean_text_is_idempotent(text, spec):
    config = CleaningConfig.from_spec(spec)
    once = clean_text(text, config=config)
    assert clean_text(once, config=config) == once


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(TEXTS.filter(str.strip), st.integers(0, 1), st.sampled_from("ab")),
                     min_size=1, max_size=12),
       spec=SPECS)
def test_clean_dataset_is_idempotent(rows, spec):
    config = CleaningConfig.from_spec(spec)
    ds = dataset([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    try:
        once, _ = clean_dataset(ds, config=config)
    except DataError:  # every text was invisible
        assert config.whitespace
        return
    twice, counts = clean_dataset(once, config=config)
    assert (twice.texts, twice.labels.tolist(), twice.groups) == (once.texts, once.labels.tolist(), once.groups)
    assert counts["rows_in"] == counts["rows_out"] == len(once)
    assert all(counts[r]["changed"] == counts[r]["removed"] == 0 for r in config.rules)


# --------------------------------------------------------------------------------------------- datasets


def test_dedup_keeps_the_first_and_keeps_groups_and_labels_aligned():
    texts = ["good  visit", "good visit", "bad visit", "good visit", "bad visit", "fine", "Good visit"]
    labels = [1, 1, 0, 0, 0, 1, 1]
    groups = ["north", "south", "east", "west", "north", "south", "east"]
    out, counts = clean_dataset(dataset(texts, labels, groups), config=CleaningConfig.from_spec("whitespace,dedup"))
    # row 1 duplicates row 0 once whitespace is collapsed; row 3 has the same text with another label (kept,
    # counted as a conflict); row 4 duplicates row 2; case differs in row 6, so it is not a duplicate.
    assert out.texts == ["good visit", "bad visit", "good visit", "fine", "Good visit"]
    assert out.labels.tolist() == [1, 0, 0, 1, 1]
    assert out.groups == ["north", "east", "west", "south", "east"]
    assert out.labels.dtype == np.int64 and out.label_names == LABELS and out.source == "mem.jsonl"
    assert counts == {
        "rows_in": 7, "rows_out": 5,
        "whitespace": {"changed": 1, "removed": 0},
        "dedup": {"changed": 0, "removed": 2, "conflicting_labels": 1},
    }


def test_dedup_without_groups():
    out, counts = clean_dataset(dataset(["a", "a", "b"], [0, 0, 1]), config=only("dedup"))
    assert (out.texts, out.labels.tolist(), out.groups) == (["a", "b"], [0, 1], None)
    assert counts["dedup"] == {"changed": 0, "removed": 1, "conflicting_labels": 0}


def test_counts_per_rule_on_a_mixed_dataset():
    texts = ["cafÃ© ok", "see https://a.example now", "@ann mail ann@b.example", "\u200b", "plain",
             "plain", "cafe\u0301  ok"]
    out, counts = clean_dataset(dataset(texts, [1, 0, 1, 0, 1, 1, 1]), config=ALL)
    assert out.texts == ["café ok", f"see {MASK_URL} now", f"{MASK_USER} mail {MASK_EMAIL}", "plain"]
    assert counts == {
        "rows_in": 7, "rows_out": 4,
        "unicode": {"changed": 2, "removed": 0},
        "whitespace": {"changed": 1, "removed": 1},  # the invisible-only row is removed, not changed
        "urls": {"changed": 1, "removed": 0},
        "emails": {"changed": 1, "removed": 0},
        "handles": {"changed": 1, "removed": 0},
        "dedup": {"changed": 0, "removed": 2, "conflicting_labels": 0},  # "plain" and the second café
    }
    assert out.meta["cleaning"] == counts


def test_a_dataset_left_empty_is_an_error_naming_the_file():
    with pytest.raises(DataError) as e:
        clean_dataset(dataset(["\u200b", "\ufeff\u00ad"], [0, 1]), config=only("whitespace"))
    assert e.value.problems == [ERR_NOTHING_LEFT.format(file="mem.jsonl", spec="whitespace")]


def test_counts_never_carry_text_and_survive_the_metric_record_round_trip():
    _, counts = clean_dataset(dataset(["secret  text", "secret text"], [0, 0]), config=ALL)
    metrics = counts_to_metrics(counts)
    assert all(isinstance(v, int) for v in metrics.values())
    assert "secret" not in json.dumps(metrics)
    assert metrics["clean-dedup-conflicting-labels"] == 0 and metrics["clean-rows-in"] == 2
    rest, back = split_cleaning_metrics({"num-examples": 5, "train-loss": 0.5, **metrics})
    assert rest == {"num-examples": 5, "train-loss": 0.5}
    assert back == counts
    assert split_cleaning_metrics({"num-examples": 0}) == ({"num-examples": 0}, None)


def test_run_dir_keeps_the_first_counts_per_node(tmp_path):
    from server.rundir import RunDir

    rd = RunDir(tmp_path / "run")
    assert rd.read_cleaning() == {}
    assert rd.record_cleaning({"rows_in": 3, "rows_out": 2}, node="node-0") is True
    assert rd.record_cleaning({"rows_in": 9, "rows_out": 9}, node="node-0") is False
    assert rd.record_cleaning({"rows_in": 4, "rows_out": 4}, node=None) is True
    assert json.loads(rd.cleaning_path.read_text()) == {
        "nodes": {"node-0": {"rows_in": 3, "rows_out": 2}}, "eval_data": {"rows_in": 4, "rows_out": 4}}


# --------------------------------------------------------------------------------------------- node + server

NODE_ROWS = [
    [("great visit  https://clinic.example/a", "positive"), ("great visit https://clinic.example/b", "positive"),
     ("cafÃ© was awful", "negative"), ("awful wait", "negative"), ("awful wait", "negative"),
     ("lovely staff", "positive"), ("rude staff", "negative"), ("kind nurse", "positive")],
    [("@ann was superb", "positive"), ("mail ann@clinic.example, dreadful", "negative"),
     ("superb\u200b care", "positive"), ("superb care", "positive"), ("dreadful food", "negative"),
     ("excellent app", "positive"), ("useless app", "negative")],
]
EVAL_ROWS = [("superb  care", "positive"), ("superb care", "positive"), ("awful wait", "negative"),
             ("see www.clinic.example", "positive")]


def _write(path: Path, rows) -> Path:
    ds = TextDataset(texts=[t for t, _ in rows], labels=np.asarray([LABELS.index(y) for _, y in rows]),
                     label_names=LABELS)
    return write_dataset(ds, path, schema=Schema())


def test_node_cleans_before_its_split_and_keeps_the_raw_fingerprint(tmp_path):
    from client.node import load_node_data
    from common.config import NodeConfig
    from common.data import dataset_fingerprint

    path = _write(tmp_path / "d.jsonl", NODE_ROWS[0])
    node = NodeConfig(data_path=str(path))
    base = RunConfig(model="tiny", labels=",".join(LABELS), max_length=16)
    raw = load_node_data(node, base, model_source="tiny")
    cleaned = load_node_data(node, base.replace(clean="all"), model_source="tiny")
    assert raw.cleaning == {} and raw.n_total == 8
    assert cleaned.n_total == len(cleaned.train) + len(cleaned.val) == 6  # two URL duplicates, one exact
    # The accountant is keyed by the data as read: cleaning on or off spends from the same budget.
    assert cleaned.fingerprint == raw.fingerprint == dataset_fingerprint(
        load_dataset(path, schema=Schema(), labels=LABELS))
    assert cleaned.cleaning["clean-dedup-removed"] == 2 and cleaned.cleaning["clean-urls-changed"] == 2


class DirectGrid:
    """A Flower ``Grid`` stand-in that hands each message to the ClientApp handlers in this process."""

    def __init__(self, nodes_dir: Path, num_nodes: int) -> None:
        self.nodes_dir = nodes_dir
        self.node_ids = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import Context, MessageType, RecordDict

        from client.app import handle_evaluate, handle_train

        replies = []
        for msg in messages:
            nid = int(msg.metadata.dst_node_id)
            context = Context(run_id=1, node_id=nid, node_config={"partition-id": nid - 1}, state=RecordDict(),
                              run_config={})
            handler = handle_train if msg.metadata.message_type == MessageType.TRAIN else handle_evaluate
            replies.append(handler(msg, context, sim_nodes_dir=str(self.nodes_dir)))
        return replies


def test_counts_reach_the_run_directory_once_per_node(tmp_path, server_task, _one_torch_thread):
    from server.loop import run_federation

    nodes_dir = tmp_path / "nodes"
    for i, rows in enumerate(NODE_ROWS):
        ndir = nodes_dir / f"node-{i}"
        data = _write(ndir / "data.jsonl", rows)
        (ndir / "node.json").write_text(json.dumps({"node-name": f"node-{i}", "data-path": str(data),
                                                    "state-dir": str(ndir / "state"),
                                                    "share-cleaning-counts": True,
                                                    "require-dp": False}))  # the run trains without DP
    eval_path = _write(tmp_path / "eval.csv", EVAL_ROWS)
    cfg = RunConfig(model="tiny", labels=",".join(LABELS), num_server_rounds=2, dp=False, batch_size=4,
                    max_physical_batch_size=4, max_length=16, device="cpu", clean="all", eval_data=str(eval_path),
                    out=str(tmp_path / "run"))
    summary = run_federation(DirectGrid(nodes_dir, 2), cfg, wait_timeout=5)
    assert summary.rounds_done == 2

    expected = {}
    for i in range(2):
        ds = load_dataset(nodes_dir / f"node-{i}" / "data.jsonl", schema=Schema(), labels=LABELS)
        expected[f"node-{i}"] = clean_dataset(ds, config=ALL)[1]
    eval_counts = clean_dataset(load_dataset(eval_path, schema=Schema(), labels=LABELS), config=ALL)[1]
    recorded = json.loads((tmp_path / "run" / "cleaning.json").read_text())
    assert recorded == {"nodes": expected, "eval_data": eval_counts}
    assert expected["node-1"]["emails"]["changed"] == 1 and expected["node-1"]["handles"]["changed"] == 1
    assert eval_counts["dedup"]["removed"] == 1

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:  # counts are not repeated per node per round
        for name, node_row in r["nodes"].items():
            assert not [k for k in node_row if k.startswith("clean-")], name
            # trained on the cleaned rows (80 % of them after the validation split)
            assert node_row["num-examples"] < expected[name]["rows_out"] <= expected[name]["rows_in"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Data cleaning" in report and "| eval-data (server) | 4 | 3 |" in report


def test_counts_stay_on_the_node_unless_it_opts_in(tmp_path, server_task) -> None:
    """The counts are exact statistics of private data: a node sends them only with share-cleaning-counts."""
    import json as _json

    from flwr.app import Context, Message, MessageType, RecordDict

    from client.app import handle_train
    from common.config import RunConfig
    from common.model import ModelSpec, build_model, to_array_record, trainable_state
    from server.rounds import config_record
    from simulations.runner import SimOptions, prepare_nodes


    cfg = RunConfig(model="tiny", dp=False, clean="all", train_part="head", out=str(tmp_path / "run"))
    cfg, nodes_dir = prepare_nodes(cfg, SimOptions(nodes=1, synthetic_size=40), tmp_path / "run")
    arrays = trainable_state(build_model(ModelSpec(source="tiny", labels=tuple(cfg.label_names), top_k_layers=0)))

    def reply_metrics(share: bool) -> dict:
        path = nodes_dir / "node-0" / "node.json"
        node_cfg = _json.loads(path.read_text())
        node_cfg["share-cleaning-counts"] = share
        path.write_text(_json.dumps(node_cfg))
        msg = Message(RecordDict({"arrays": to_array_record(arrays),
                                  "config": config_record(cfg, run_id="r", server_round=1)}),
                      dst_node_id=1, message_type=MessageType.TRAIN)
        ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
        return dict(handle_train(msg, ctx, sim_nodes_dir=str(nodes_dir)).content["metrics"])

    assert any(k.startswith("clean-") for k in reply_metrics(True))
    assert not any(k.startswith("clean-") for k in reply_metrics(False))
