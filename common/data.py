"""Dataset schema, readers (CSV, TSV, JSONL, Parquet; plaintext or fedpriv containers), tokenization, split.

A dataset is a table with a text column, a label column and an optional group column; their names are
configurable. Labels may be strings or integers; the federation shares one label list (class names in index
order) and every label must be in it. All problems of a file are collected and raised once, naming the file,
the row (1-based data row, header excluded) and the column, so nothing trains on half-read data.

Encrypted files (see ``common.crypto`` and docs/container-format.md) are decrypted in memory only; the inner
format comes from the container header.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common import crypto

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}
MAX_REPORTED = 10  # problems listed per error before "... and N more"

ERR_EMPTY_FILE = "{file}: the file is empty; expected a header and at least one data row"
ERR_NO_ROWS = "{file}: no data rows (only a header)"
ERR_FORMAT = "{file}: unsupported file type {suffix!r}; expected one of .csv, .tsv, .jsonl, .parquet"
ERR_ENCODING = "{file}, row {row}: not valid UTF-8 (byte 0x{byte:02x} at offset {offset}); the file mixes encodings, re-save it as UTF-8"
ERR_MISSING_COL = "{file}: missing column {col!r} (--{flag}); columns present: {present}"
ERR_EMPTY_TEXT = "{file}, row {row}, column {col!r}: empty text"
ERR_MISSING_LABEL = "{file}, row {row}, column {col!r}: missing label"
ERR_UNKNOWN_LABEL = "{file}, row {row}, column {col!r}: unknown label {value!r}; expected one of {expected}"
ERR_MISSING_GROUP = "{file}, row {row}, column {col!r}: missing group value (fill it in, or use an explicit value such as 'unknown')"
ERR_BAD_JSON = "{file}, row {row}: not a JSON object ({reason})"
ERR_FIELD_COUNT = "{file}, row {row}: {got} fields, the header has {expected}"
ERR_UNREADABLE = "{file}: cannot be read ({reason})"
ERR_PLAINTEXT_REFUSED = "{file}: node config require-encryption=true but the file is not a fedpriv container; encrypt it with `fedpriv dataset encrypt`"
ERR_ONE_CLASS = "{file}: labels must have at least two classes; found {labels}"
ERR_COLUMN_TYPE = "{file}: column {col!r} (--{flag}) has type {type}; expected {expected}"


class DataError(ValueError):
    """A dataset file cannot be used; the message lists every problem found (file, row, column)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        shown = self.problems[:MAX_REPORTED]
        more = len(self.problems) - len(shown)
        text = "\n".join(shown) + (f"\n... and {more} more problems" if more > 0 else "")
        super().__init__(text)


@dataclass(frozen=True)
class Schema:
    """Column names. An empty ``group_col`` means the data has no group attribute."""

    text_col: str = "text"
    label_col: str = "label"
    group_col: str = ""


@dataclass
class TextDataset:
    """Validated rows: texts, label indices (into ``labels``) and optional group names."""

    texts: list[str]
    labels: np.ndarray  # int64 [n]
    label_names: list[str]
    groups: list[str] | None = None
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx: Sequence[int] | np.ndarray) -> TextDataset:
        idx = np.asarray(idx, dtype=np.int64)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx],
            label_names=self.label_names,
            groups=None if self.groups is None else [self.groups[i] for i in idx],
            source=self.source,
        )


# --------------------------------------------------------------------------------------------- reading


def detect_format(name: str) -> str | None:
    return FORMATS.get(Path(name).suffix.lower())


def _decode_utf8(raw: bytes | bytearray, file: str, *, header: bool) -> str:
    """Decode UTF-8; on failure name every line holding an invalid byte as a data row.

    ``header``: the first line is a header (CSV/TSV), so line ``k`` (0-based) is data row ``k``; without a
    header (JSONL) it is data row ``k + 1``.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        problems = []
        offset = 0
        for line_no, line in enumerate(bytes(raw).split(b"\n")):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                row = max(line_no if header else line_no + 1, 1)
                problems.append(ERR_ENCODING.format(file=file, row=row, byte=line[exc.start],
                                                    offset=offset + exc.start))
            offset += len(line) + 1
        raise DataError(problems) from None
    return text.removeprefix("\ufeff")


class _Rows(list):
    """Parsed rows plus their 1-based data-row numbers in the file (blank lines keep their number) and, for
    typed formats (Parquet), each column's kind (``text``, ``number``, ``bool``, ``nested``, ``other``) and
    type name."""

    numbers: list[int]
    types: dict[str, tuple[str, str]]


def _arrow_kind(typ) -> str:
    import pyarrow as pa

    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or getattr(pa.types, "is_string_view",
                                                                          lambda _t: False)(typ):
        return "text"
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return "number"
    if pa.types.is_boolean(typ):
        return "bool"
    if pa.types.is_nested(typ):
        return "nested"
    return "other"


def check_column_types(rows, *, schema: Schema, file: str) -> None:
    """Typed files (Parquet): the text column must hold strings; label and group columns strings, integers,
    numbers or booleans. Nested (list, struct, map) and binary columns are refused naming the column."""
    types = getattr(rows, "types", None) or {}
    problems = []
    for col, flag, allowed in ((schema.text_col, "text-col", ("text",)),
                               (schema.label_col, "label-col", ("text", "number", "bool")),
                               (schema.group_col, "group-col", ("text", "number", "bool"))):
        if col and col in types and types[col][0] not in allowed:
            expected = "strings" if allowed == ("text",) else "strings, integers or booleans (one value per row)"
            problems.append(ERR_COLUMN_TYPE.format(file=file, col=col, flag=flag, type=types[col][1],
                                                   expected=expected))
    if problems:
        raise DataError(problems)


def _cell_to_str(value: Any) -> str | None:
    """Normalise a cell: None/NaN -> None; integral floats -> "3"; everything else -> str."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return _cell_to_str(float(value))
    return str(value)


def read_rows(raw: bytes, *, fmt: str, file: str) -> tuple[list[str], list[dict[str, str | None]]]:
    """Parse ``raw`` bytes of the given format into (columns, rows of str-or-None cells)."""
    if not raw or raw.isspace():  # no copy of a large (possibly decrypted) buffer
        raise DataError([ERR_EMPTY_FILE.format(file=file)])
    if fmt in ("csv", "tsv"):
        import csv

        text = _decode_utf8(raw, file, header=True)
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="," if fmt == "csv" else "\t")
        try:
            header = next(reader)
            records = [r for r in reader]
        except csv.Error as exc:
            raise DataError([ERR_UNREADABLE.format(file=file, reason=exc)]) from None
        header = [h.strip() for h in header]
        rows: _Rows = _Rows()
        rows.numbers = []
        problems: list[str] = []
        for i, rec in enumerate(records, start=1):
            if not rec:  # blank line
                continue
            if len(rec) != len(header):
                problems.append(ERR_FIELD_COUNT.format(file=file, row=i, got=len(rec), expected=len(header)))
                continue
            rows.append(dict(zip(header, rec, strict=True)))
            rows.numbers.append(i)
        if problems:
            raise DataError(problems)
        return header, rows
    if fmt == "jsonl":
        text = _decode_utf8(raw, file, header=False)
        rows = _Rows()
        rows.numbers = []
        columns: dict[str, None] = {}
        problems = []
        # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085, \x1c.., which JSON strings
        # may hold unescaped (json.dumps(ensure_ascii=False) writes them raw).
        for i, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(ERR_BAD_JSON.format(file=file, row=i, reason=exc.msg))
                continue
            if not isinstance(obj, dict):
                problems.append(ERR_BAD_JSON.format(file=file, row=i, reason=f"got {type(obj).__name__}"))
                continue
            rows.append({k: _cell_to_str(v) for k, v in obj.items()})
            rows.numbers.append(i)
            columns.update(dict.fromkeys(obj))
        if problems:
            raise DataError(problems)
        return list(columns), rows
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(pa.py_buffer(raw)))
        except Exception as exc:  # pyarrow raises several types for corrupt input
            raise DataError([ERR_UNREADABLE.format(file=file, reason=exc)]) from None
        cols = table.column_names
        types = {c: (_arrow_kind(table.schema.field(c).type), str(table.schema.field(c).type)) for c in cols}
        # Nested and binary cells are never turned into strings: those columns are refused by
        # check_column_types if the schema uses them, and read as missing otherwise.
        scalar = [c for c in cols if types[c][0] in ("text", "number", "bool")]
        data = table.select(scalar).to_pydict()
        rows = _Rows({c: _cell_to_str(data[c][i]) if c in data else None for c in cols}
                     for i in range(table.num_rows))
        rows.numbers = list(range(1, table.num_rows + 1))
        rows.types = types
        return cols, rows
    raise DataError([ERR_FORMAT.format(file=file, suffix=fmt)])


def read_file_bytes(path: str | Path, *, key_source=None, require_encryption: bool = False) -> tuple[bytes, str]:
    """Return (plaintext bytes, format) of a dataset file; containers are decrypted in memory."""

    path = Path(path)
    file = str(path)
    if not path.is_file():
        raise DataError([ERR_UNREADABLE.format(file=file, reason="no such file")])
    if crypto.is_container(path):
        if key_source is None:
            raise DataError([f"{file}: the file is an encrypted fedpriv container; give key-file or passphrase-env"])
        info = crypto.inspect(path)
        inner = str(info.get("inner_name") or "")
        fmt = detect_format(inner) or detect_format(path.name.removesuffix(".fpenc").removesuffix(".enc"))
        if fmt is None:
            raise DataError([ERR_FORMAT.format(file=file, suffix=Path(inner).suffix or "(none)")])
        return crypto.decrypt_to_memory(path, key_source=key_source), fmt
    if require_encryption:
        raise DataError([ERR_PLAINTEXT_REFUSED.format(file=file)])
    fmt = detect_format(path.name)
    if fmt is None:
        raise DataError([ERR_FORMAT.format(file=file, suffix=path.suffix or "(none)")])
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError([ERR_UNREADABLE.format(file=file, reason=exc.strerror)]) from None
    return raw, fmt


def observed_labels(path: str | Path, *, schema: Schema, key_source=None) -> list[str]:
    """Sorted distinct labels in a file (ints sort numerically), for building the federation's label list."""
    raw, fmt = read_file_bytes(path, key_source=key_source)
    cols, rows = read_rows(raw, fmt=fmt, file=str(path))
    if schema.label_col not in cols:
        raise DataError([ERR_MISSING_COL.format(file=path, col=schema.label_col, flag="label-col", present=cols)])
    check_column_types(rows, schema=schema, file=str(path))
    values = {r.get(schema.label_col) for r in rows} - {None, ""}
    return sort_labels(values)


def sort_labels(values) -> list[str]:
    values = [str(v) for v in values]
    if all(v.lstrip("-").isdigit() for v in values):
        return sorted(values, key=int)
    return sorted(values)


def parse_rows(cols: list[str], rows: list[dict[str, str | None]], *, schema: Schema,
               labels: Sequence[str], file: str) -> TextDataset:
    """Validate every row against the schema and label list; raise one DataError listing all problems."""
    problems: list[str] = []
    for col, flag in ((schema.text_col, "text-col"), (schema.label_col, "label-col"), (schema.group_col, "group-col")):
        if col and col not in cols:
            problems.append(ERR_MISSING_COL.format(file=file, col=col, flag=flag, present=cols))
    if problems:
        raise DataError(problems)
    check_column_types(rows, schema=schema, file=file)
    if not rows:
        raise DataError([ERR_NO_ROWS.format(file=file)])
    labels = [str(x) for x in labels]  # the label list may be given as ints; cells are strings
    index = {name: i for i, name in enumerate(labels)}
    expected = ", ".join(repr(x) for x in labels)
    numbers = getattr(rows, "numbers", None) or range(1, len(rows) + 1)
    texts: list[str] = []
    ys: list[int] = []
    groups: list[str] = []
    for i, row in zip(numbers, rows, strict=True):
        text = row.get(schema.text_col)
        if text is None or not text.strip():
            problems.append(ERR_EMPTY_TEXT.format(file=file, row=i, col=schema.text_col))
        label = row.get(schema.label_col)
        label = label.strip() if label is not None else None
        if not label:
            problems.append(ERR_MISSING_LABEL.format(file=file, row=i, col=schema.label_col))
        elif label not in index:
            problems.append(ERR_UNKNOWN_LABEL.format(file=file, row=i, col=schema.label_col, value=label, expected=expected))
        if schema.group_col:
            g = row.get(schema.group_col)
            if g is None or not g.strip():
                problems.append(ERR_MISSING_GROUP.format(file=file, row=i, col=schema.group_col))
            else:
                groups.append(g.strip())
        if not problems:
            texts.append(text.strip())  # type: ignore[union-attr]
            ys.append(index[label])  # type: ignore[index]
    if problems:
        raise DataError(problems)
    return TextDataset(texts=texts, labels=np.asarray(ys, dtype=np.int64), label_names=list(labels),
                       groups=groups if schema.group_col else None, source=file)


def load_dataset(path: str | Path, *, schema: Schema, labels: Sequence[str], key_source=None,
                 require_encryption: bool = False) -> TextDataset:
    """Read, decrypt if needed, and validate a dataset file. Nothing is returned unless every row is valid."""
    if len(labels) < 2:
        raise DataError([ERR_ONE_CLASS.format(file=path, labels=list(labels))])
    raw, fmt = read_file_bytes(path, key_source=key_source, require_encryption=require_encryption)
    cols, rows = read_rows(raw, fmt=fmt, file=str(path))
    del raw
    ds = parse_rows(cols, rows, schema=schema, labels=labels, file=str(path))
    ds.meta["format"] = fmt
    return ds


def dataset_fingerprint(ds: TextDataset) -> str:
    """SHA-256 over the validated rows: identifies 'the same data' for the node's accountant and ledger."""
    import hashlib

    h = hashlib.sha256()
    for t, y in zip(ds.texts, ds.labels.tolist(), strict=True):
        h.update(t.encode("utf-8"))
        h.update(b"\x1f")
        h.update(str(y).encode())
        h.update(b"\x1e")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- writing


def write_dataset(ds: TextDataset, path: str | Path, *, schema: Schema) -> Path:
    """Write a dataset in the format given by the file suffix (used by simulations and tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_records(to_records(ds, schema=schema), fmt=detect_format(path.name)))
    return path


def to_records(ds: TextDataset, *, schema: Schema) -> list[dict[str, Any]]:
    """Rows as dicts keyed by the schema's column names (labels as class names)."""
    records = []
    for i, t in enumerate(ds.texts):
        rec = {schema.text_col: t, schema.label_col: ds.label_names[int(ds.labels[i])]}
        if schema.group_col and ds.groups is not None:
            rec[schema.group_col] = ds.groups[i]
        records.append(rec)
    return records


def encode_records(records: list[dict[str, Any]], *, fmt: str | None) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if fmt in ("csv", "tsv"):
        import csv

        buf = io.StringIO()
        cols = list(records[0]) if records else []
        # QUOTE_MINIMAL quotes only characters of the line terminator; a lone "\r" must be quoted too.
        has_cr = any("\r" in str(v) for r in records for v in r.values())
        w = csv.DictWriter(buf, fieldnames=cols, delimiter="," if fmt == "csv" else "\t", lineterminator="\n",
                           quoting=csv.QUOTE_ALL if has_cr else csv.QUOTE_MINIMAL)
        w.writeheader()
        w.writerows(records)
        return buf.getvalue().encode("utf-8")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(records), sink)
        return sink.getvalue().to_pybytes()
    raise ValueError(f"unsupported output format {fmt!r}")


# --------------------------------------------------------------------------------------------- splits


def train_val_split(n: int, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)``; at least one training example, validation may be empty for n == 1."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    n_val = min(max(n_val, 1 if n >= 2 else 0), n - 1) if n else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def kfold_split(n: int, *, folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of fold ``fold`` of a seeded ``folds``-way partition of ``range(n)``.

    The validation sets of folds 0..K-1 are disjoint and together cover every index exactly once; fold sizes
    differ by at most one. Needs ``2 <= folds <= n`` and ``0 <= fold < folds``.
    """
    if folds < 2 or folds > n:
        raise ValueError(f"cross-validation needs 2 <= folds <= examples; got folds={folds}, examples={n}")
    if not 0 <= fold < folds:
        raise ValueError(f"fold must be in 0..{folds - 1}; got {fold}")
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(perm, folds)
    val = np.sort(parts[fold])
    train = np.sort(np.concatenate([p for i, p in enumerate(parts) if i != fold]))
    return train, val


# --------------------------------------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    """Token ids per example (unpadded, truncated) and labels; batches are padded when collated."""

    input_ids: list[list[int]]
    labels: np.ndarray
    groups: list[str] | None = None

    def __len__(self) -> int:
        return len(self.input_ids)


def encode(ds: TextDataset, tokenizer, *, max_length: int) -> Encoded:
    out = tokenizer(ds.texts, truncation=True, max_length=max_length, padding=False)
    return Encoded(input_ids=[list(x) for x in out["input_ids"]], labels=ds.labels.copy(), groups=ds.groups)


def collate(input_ids: Sequence[Sequence[int]], labels: Sequence[int] | np.ndarray, *, pad_id: int = 0):
    """Pad a batch; returns a dict of tensors with explicit ``position_ids`` and ``token_type_ids``.

    Opacus needs both passed explicitly for per-sample gradients of BERT embeddings (see environment notes).
    """
    import torch

    b = len(input_ids)
    t = max((len(x) for x in input_ids), default=1)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.long)
    for i, x in enumerate(input_ids):
        ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros((b, t), dtype=torch.long),
        "position_ids": torch.arange(t, dtype=torch.long).unsqueeze(0).repeat(b, 1),
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)),
    }
