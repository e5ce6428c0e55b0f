"""Dataset readers (CSV, TSV, JSONL, Parquet), their error messages, splits, encoding and fingerprints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.data import (
    ERR_BAD_JSON,
    ERR_EMPTY_FILE,
    ERR_EMPTY_TEXT,
    ERR_ENCODING,
    ERR_FIELD_COUNT,
    ERR_FORMAT,
    ERR_MISSING_COL,
    ERR_MISSING_GROUP,
    ERR_MISSING_LABEL,
    ERR_NO_ROWS,
    ERR_ONE_CLASS,
    ERR_PLAINTEXT_REFUSED,
    ERR_UNKNOWN_LABEL,
    ERR_UNREADABLE,
    MAX_REPORTED,
    DataError,
    Schema,
    TextDataset,
    collate,
    dataset_fingerprint,
    encode,
    load_dataset,
    observed_labels,
    sort_labels,
    to_records,
    train_val_split,
    write_dataset,
)

FORMATS = ["csv", "tsv", "jsonl", "parquet"]
STR_LABELS = ["neg", "pos"]
INT_LABELS = ["0", "1"]
SCHEMA = Schema(text_col="text", label_col="label")
GROUP_SCHEMA = Schema(text_col="text", label_col="label", group_col="site")
SST2 = Path("/work/shared/data/sst2/train.tsv")


def write_table(path: Path, columns: list[str], rows: list[list], *, int_labels: bool = False) -> Path:
    """Write rows in the format given by ``path``'s suffix, the way a user's tool would.

    ``None`` is a missing cell (empty in CSV/TSV, ``null`` in JSONL and Parquet). With ``int_labels`` the
    label column holds integers (JSON numbers, Parquet int64, bare digits in CSV).
    """
    fmt = path.suffix.lstrip(".")

    def cell(col, v):
        return int(v) if (int_labels and col == "label" and v is not None) else v

    if fmt in ("csv", "tsv"):
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writerow(columns)
        w.writerows([["" if v is None else v for v in r] for r in rows])
        path.write_text(buf.getvalue(), encoding="utf-8")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({c: cell(c, v) for c, v in zip(columns, r, strict=True)}) + "\n"
                                for r in rows), encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = {c: [cell(c, r[i]) for r in rows] for i, c in enumerate(columns)}
        types = {c: (pa.int64() if (int_labels and c == "label") else pa.string()) for c in columns}
        pq.write_table(pa.table({c: pa.array(v, type=types[c]) for c, v in data.items()}), path)
    else:
        raise ValueError(fmt)
    return path


def problems_of(path: Path, *, schema: Schema = SCHEMA, labels=STR_LABELS) -> list[str]:
    with pytest.raises(DataError) as e:
        load_dataset(path, schema=schema, labels=labels)
    return e.value.problems


# --------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("int_labels", [False, True], ids=["str-labels", "int-labels"])
def test_reads_every_format_with_str_and_int_labels(tmp_path, fmt, int_labels):
    labels = INT_LABELS if int_labels else STR_LABELS
    rows = [["good visit", labels[1], "north"], ["  slow, rude staff ", labels[0], "south"],
            ["ok\tfine \"quoted\"", labels[1], " south "]]
    path = write_table(tmp_path / f"d.{fmt}", ["text", "label", "site"], rows, int_labels=int_labels)
    ds = load_dataset(path, schema=GROUP_SCHEMA, labels=labels)
    assert ds.texts == ["good visit", "slow, rude staff", "ok\tfine \"quoted\""]  # cells are stripped
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [1, 0, 1]
    assert ds.groups == ["north", "south", "south"]
    assert ds.label_names == labels
    assert ds.meta["format"] == fmt
    assert len(ds) == 3


def test_label_list_may_be_given_as_ints(tmp_path):
    path = write_table(tmp_path / "d.parquet", ["text", "label"], [["a", 1], ["b", 0]], int_labels=True)
    assert load_dataset(path, schema=SCHEMA, labels=[0, 1]).labels.tolist() == [1, 0]


def test_configurable_column_names_and_no_group(tmp_path):
    path = write_table(tmp_path / "d.csv", ["sentence", "y", "extra"], [["hi there", "pos", "x"]] * 2)
    ds = load_dataset(path, schema=Schema(text_col="sentence", label_col="y"), labels=STR_LABELS)
    assert ds.texts == ["hi there"] * 2 and ds.groups is None


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,label\r\ncafé crème,pos\r\n".encode())
    assert load_dataset(path, schema=SCHEMA, labels=STR_LABELS).texts == ["café crème"]


def test_blank_lines_are_skipped_but_rows_keep_their_number(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,pos\n\n,neg\n\n")
    assert problems_of(path) == [ERR_EMPTY_TEXT.format(file=path, row=3, col="text")]
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "meh"}\n')
    expected = ", ".join(repr(x) for x in STR_LABELS)
    assert problems_of(path) == [ERR_UNKNOWN_LABEL.format(file=path, row=3, col="label", value="meh",
                                                          expected=expected)]


@pytest.mark.skipif(not SST2.is_file(), reason=f"{SST2} not present")
def test_reads_sst2_train_tsv():
    ds = load_dataset(SST2, schema=Schema(text_col="sentence", label_col="label"), labels=INT_LABELS)
    assert len(ds) == 6920
    assert set(ds.labels.tolist()) == {0, 1}
    assert observed_labels(SST2, schema=Schema(text_col="sentence", label_col="label")) == INT_LABELS


def test_observed_labels_sort_ints_numerically(tmp_path):
    path = write_table(tmp_path / "d.jsonl", ["text", "label"], [["a", "10"], ["b", "2"], ["c", None]],
                       int_labels=True)
    assert observed_labels(path, schema=SCHEMA) == ["2", "10"]
    assert sort_labels(["pos", "neg", "mixed"]) == ["mixed", "neg", "pos"]
    assert sort_labels(["-1", "1", "0"]) == ["-1", "0", "1"]


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_column_names_flag_and_present_columns(tmp_path, fmt):
    path = write_table(tmp_path / f"d.{fmt}", ["body", "label"], [["x", "pos"]])
    assert problems_of(path, schema=GROUP_SCHEMA) == [
        ERR_MISSING_COL.format(file=path, col="text", flag="text-col", present=["body", "label"]),
        ERR_MISSING_COL.format(file=path, col="site", flag="group-col", present=["body", "label"]),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_bad_cell_is_reported_with_row_and_column(tmp_path, fmt):
    rows = [
        ["fine", "pos", "north"],
        ["   ", "pos", "north"],  # row 2: empty text
        ["fine", None, "north"],  # row 3: missing label
        ["fine", "meh", "north"],  # row 4: unknown label
        ["fine", "neg", None],  # row 5: missing group
        [None, None, "south"],  # row 6: two problems in one row
    ]
    path = write_table(tmp_path / f"d.{fmt}", ["text", "label", "site"], rows)
    expected_labels = ", ".join(repr(x) for x in STR_LABELS)
    assert problems_of(path, schema=GROUP_SCHEMA) == [
        ERR_EMPTY_TEXT.format(file=path, row=2, col="text"),
        ERR_MISSING_LABEL.format(file=path, row=3, col="label"),
        ERR_UNKNOWN_LABEL.format(file=path, row=4, col="label", value="meh", expected=expected_labels),
        ERR_MISSING_GROUP.format(file=path, row=5, col="site"),
        ERR_EMPTY_TEXT.format(file=path, row=6, col="text"),
        ERR_MISSING_LABEL.format(file=path, row=6, col="label"),
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_one_bad_row_among_many_returns_nothing(tmp_path, fmt):
    rows = [[f"text {i}", "pos" if i % 2 else "neg"] for i in range(200)]
    rows[150][1] = "3"
    path = write_table(tmp_path / f"d.{fmt}", ["text", "label"], rows)
    expected = ", ".join(repr(x) for x in STR_LABELS)
    assert problems_of(path) == [ERR_UNKNOWN_LABEL.format(file=path, row=151, col="label", value="3",
                                                          expected=expected)]


def test_many_problems_are_summarised(tmp_path):
    path = write_table(tmp_path / "d.csv", ["text", "label"], [["", "pos"]] * (MAX_REPORTED + 5))
    with pytest.raises(DataError) as e:
        load_dataset(path, schema=SCHEMA, labels=STR_LABELS)
    assert len(e.value.problems) == MAX_REPORTED + 5
    lines = str(e.value).splitlines()
    assert lines[:MAX_REPORTED] == e.value.problems[:MAX_REPORTED]
    assert lines[MAX_REPORTED:] == ["... and 5 more problems"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("content", [b"", b" \n\n"], ids=["zero-bytes", "whitespace"])
def test_empty_file(tmp_path, fmt, content):
    path = tmp_path / f"d.{fmt}"
    path.write_bytes(content)
    assert problems_of(path) == [ERR_EMPTY_FILE.format(file=path)]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_header_only_file(tmp_path, fmt):
    path = write_table(tmp_path / f"d.{fmt}", ["text", "label"], [])
    assert problems_of(path) == [ERR_NO_ROWS.format(file=path)]


def test_corrupt_parquet_is_unreadable(tmp_path):
    good = write_table(tmp_path / "good.parquet", ["text", "label"], [["a", "pos"]] * 20)
    path = tmp_path / "d.parquet"
    path.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: cannot be read (")
    path.write_bytes(b"this is not parquet")
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: cannot be read (")


def test_missing_file_and_unsupported_suffix(tmp_path):
    path = tmp_path / "nope.csv"
    assert problems_of(path) == [ERR_UNREADABLE.format(file=path, reason="no such file")]
    path = tmp_path / "d.xlsx"
    path.write_bytes(b"PK")
    assert problems_of(path) == [ERR_FORMAT.format(file=path, suffix=".xlsx")]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_latin1_byte_names_its_row(tmp_path, fmt):
    # rows 1..5 of valid UTF-8, a latin-1 "é" (0xe9) in data rows 3 and 5
    path = write_table(tmp_path / f"d.{fmt}", ["text", "label"], [[f"row {i} cafe", "pos"] for i in range(1, 6)])
    raw = path.read_bytes()
    for k in (3, 5):
        raw = raw.replace(f"row {k} cafe".encode(), f"row {k} caf".encode() + b"\xe9")
    path.write_bytes(raw)
    problems = problems_of(path)
    assert [p.split(": not valid UTF-8")[0] for p in problems] == [f"{path}, row 3", f"{path}, row 5"]
    offset = raw.index(b"\xe9")
    assert problems[0] == ERR_ENCODING.format(file=path, row=3, byte=0xE9, offset=offset)


def test_bad_json_lines_are_all_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n[1, 2]\n{"text": "c", "label": "neg"}\n')
    assert problems_of(path) == [
        ERR_BAD_JSON.format(file=path, row=2, reason="Expecting value"),
        ERR_BAD_JSON.format(file=path, row=3, reason="got list"),
    ]


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_wrong_field_count(tmp_path, fmt):
    sep = "," if fmt == "csv" else "\t"
    path = tmp_path / f"d.{fmt}"
    path.write_text(f"text{sep}label\na{sep}pos\nb{sep}pos{sep}extra\nc\n")
    assert problems_of(path) == [ERR_FIELD_COUNT.format(file=path, row=2, got=3, expected=2),
                                 ERR_FIELD_COUNT.format(file=path, row=3, got=1, expected=2)]


def test_fewer_than_two_classes(tmp_path):
    path = write_table(tmp_path / "d.csv", ["text", "label"], [["a", "pos"]])
    assert problems_of(path, labels=["pos"]) == [ERR_ONE_CLASS.format(file=path, labels=["pos"])]


def test_plaintext_refused_when_encryption_required(tmp_path):
    path = write_table(tmp_path / "d.csv", ["text", "label"], [["a", "pos"]])
    with pytest.raises(DataError) as e:
        load_dataset(path, schema=SCHEMA, labels=STR_LABELS, require_encryption=True)
    assert e.value.problems == [ERR_PLAINTEXT_REFUSED.format(file=path)]


# --------------------------------------------------------------------------------------------- writing


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12).filter(
    lambda s: s.strip() == s and s)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(_text, min_size=1, max_size=6), data=st.data())
def test_write_dataset_round_trips(tmp_path, fmt, texts, data):
    label_names = data.draw(st.sampled_from([STR_LABELS, INT_LABELS, ["b", "a", "c"]]))
    labels = data.draw(st.lists(st.integers(0, len(label_names) - 1), min_size=len(texts), max_size=len(texts)))
    groups = data.draw(st.lists(_text, min_size=len(texts), max_size=len(texts)))
    ds = TextDataset(texts=texts, labels=np.asarray(labels, dtype=np.int64), label_names=label_names,
                     groups=groups)
    path = write_dataset(ds, tmp_path / f"out.{fmt}", schema=GROUP_SCHEMA)
    back = load_dataset(path, schema=GROUP_SCHEMA, labels=label_names)
    assert back.texts == ds.texts
    assert back.labels.tolist() == ds.labels.tolist()
    assert back.groups == ds.groups
    assert dataset_fingerprint(back) == dataset_fingerprint(ds)


TRICKY_TEXTS = ["line\u2028separator", "next\x85line", "lone\rreturn", "new\nline", 'say "hi", ok', "tab\there",
                "file\x1cseparator", "nul\x00byte", "emoji 🙂 and ümlaut"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_write_dataset_round_trips_line_breaking_characters(tmp_path, fmt):
    # JSON keeps U+2028/U+0085/\x1c unescaped, CSV must quote a lone \r: none of them may split a row
    ds = TextDataset(texts=TRICKY_TEXTS, labels=np.arange(len(TRICKY_TEXTS)) % 2, label_names=STR_LABELS)
    back = load_dataset(write_dataset(ds, tmp_path / f"out.{fmt}", schema=SCHEMA), schema=SCHEMA,
                        labels=STR_LABELS)
    assert back.texts == TRICKY_TEXTS and back.labels.tolist() == ds.labels.tolist()


def test_to_records_uses_schema_names_and_class_names():
    ds = TextDataset(texts=["a", "b"], labels=np.array([1, 0]), label_names=STR_LABELS, groups=["x", "y"])
    assert to_records(ds, schema=Schema("t", "y", "g")) == [{"t": "a", "y": "pos", "g": "x"},
                                                          {"t": "b", "y": "neg", "g": "y"}]
    assert to_records(ds, schema=Schema("t", "y")) == [{"t": "a", "y": "pos"}, {"t": "b", "y": "neg"}]


# --------------------------------------------------------------------------------------------- fingerprint


def test_fingerprint_is_pinned_and_sensitive():
    ds = TextDataset(texts=["good", "bad"], labels=np.array([1, 0]), label_names=STR_LABELS)
    # The framing is what ledgers store; changing it would orphan every node's accountant state.
    expected = hashlib.sha256(b"good\x1f1\x1ebad\x1f0\x1e").hexdigest()
    assert dataset_fingerprint(ds) == expected
    variants = [
        TextDataset(texts=["good", "bad"], labels=np.array([0, 0]), label_names=STR_LABELS),
        TextDataset(texts=["bad", "good"], labels=np.array([0, 1]), label_names=STR_LABELS),
        TextDataset(texts=["good ", "bad"], labels=np.array([1, 0]), label_names=STR_LABELS),
    ]
    assert len({dataset_fingerprint(v) for v in variants} | {expected}) == 4
    # groups and label names are not part of "the same data"
    same = TextDataset(texts=["good", "bad"], labels=np.array([1, 0]), label_names=["n", "p"], groups=["a", "b"])
    assert dataset_fingerprint(same) == expected


def test_fingerprint_equal_across_formats(tmp_path):
    rows = [["café", "pos"], ["naïve", "neg"], ["x, y", "pos"]]
    fps = {dataset_fingerprint(load_dataset(write_table(tmp_path / f"d.{f}", ["text", "label"], rows),
                                            schema=SCHEMA, labels=STR_LABELS)) for f in FORMATS}
    assert len(fps) == 1


# --------------------------------------------------------------------------------------------- splits


@pytest.mark.parametrize("n", [3, 10, 101])
@pytest.mark.parametrize("val_fraction", [0.1, 0.2, 0.5, 0.9])
def test_train_val_split_disjoint_covering_sized(n, val_fraction):
    tr, va = train_val_split(n, val_fraction=val_fraction, seed=7)
    assert np.intersect1d(tr, va).size == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(n))
    assert len(va) == min(max(round(n * val_fraction), 1), n - 1)
    assert len(tr) >= 1
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)  # sorted


def test_train_val_split_is_seeded():
    a = train_val_split(50, val_fraction=0.2, seed=1)
    b = train_val_split(50, val_fraction=0.2, seed=1)
    c = train_val_split(50, val_fraction=0.2, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize(("n", "n_train", "n_val"), [(0, 0, 0), (1, 1, 0), (2, 1, 1)])
def test_train_val_split_edges(n, n_train, n_val):
    tr, va = train_val_split(n, val_fraction=0.2, seed=0)
    assert (len(tr), len(va)) == (n_train, n_val)
    assert sorted(np.concatenate([tr, va]).tolist()) == list(range(n))


# --------------------------------------------------------------------------------------------- tokenization


def test_encode_truncates_without_padding(tokenizer):
    ds = TextDataset(texts=["short", " ".join(["word"] * 50)], labels=np.array([0, 1]), label_names=STR_LABELS,
                     groups=["a", "b"])
    enc = encode(ds, tokenizer, max_length=10)
    assert len(enc) == 2
    assert len(enc.input_ids[1]) == 10
    assert len(enc.input_ids[0]) == 3  # [CLS] short [SEP]
    assert enc.input_ids[0][0] == tokenizer.cls_token_id and enc.input_ids[0][-1] == tokenizer.sep_token_id
    assert enc.labels.tolist() == [0, 1] and enc.groups == ["a", "b"]
    enc.labels[0] = 1
    assert ds.labels[0] == 0  # a copy


def test_collate_pads_and_fills_explicit_ids():
    batch = collate([[5, 6, 7], [8]], np.array([1, 0]), pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0], [0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert batch["labels"].tolist() == [1, 0]
    empty = collate([], [])
    assert tuple(empty["input_ids"].shape) == (0, 1) and tuple(empty["labels"].shape) == (0,)
