"""Optional text cleaning of a node's dataset, with counts of what each rule changed.

Rules (run-config key ``clean``: a comma list of rule names, ``all`` for every rule, empty for none):

``unicode``
    NFC normalisation, then repair of mojibake: UTF-8 bytes that were decoded as Windows-1252 or Latin-1
    (``cafÃ©`` -> ``café``, ``Itâ€™s`` -> ``It’s``). Each suspicious sequence (the 8-bit image of a UTF-8
    lead byte followed by the images of its continuation bytes) is re-encoded to bytes and decoded as UTF-8;
    a text is replaced only when the result holds fewer such sequences, and repairs repeat until none
    helps, so double-encoded text is undone too.
``whitespace``
    Removes control characters and invisible format characters (zero-width space, word joiner, BOM, soft
    hyphen, bidirectional marks), turns every run of whitespace into one space and strips both ends.
    ZWJ and ZWNJ stay: they carry meaning in emoji sequences and in Persian and Indic scripts. A text
    left empty is removed.
``urls``, ``emails``, ``handles``
    Mask ``http(s)://``, ``ftp://`` and ``www.`` addresses as ``[URL]``, e-mail addresses as ``[EMAIL]`` and
    ``@user`` handles as ``[USER]``. One left-to-right scan tries e-mail before URL before handle at each
    position, so ``bob@example.org`` is one e-mail, never a handle; a handle must not follow a word
    character, so an e-mail address is never cut into a handle even when ``emails`` is off.
``dedup``
    Drops exact duplicates of (cleaned text, label) within the dataset, keeping the first; texts that occur
    with more than one label are kept and counted (``conflicting_labels``).

No stop-word, punctuation or case changes: BERT's tokenizer needs them.

Cleaning is idempotent, ``clean(clean(x)) == clean(x)``: the per-text rules are applied in passes until a
pass changes nothing (one or two passes in practice; removing an invisible character can, for example,
bring a base letter next to its combining accent, which NFC then composes).

The counts (``clean_dataset``'s second result) hold numbers only, never text; a node sends them to the
server in its train reply (``counts_to_metrics``) and the server keeps one copy per node
(``RUN_DIR/cleaning.json``).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from common.data import DataError, TextDataset

RULES = ("unicode", "whitespace", "urls", "emails", "handles", "dedup")
MASK_URL = "[URL]"
MASK_EMAIL = "[EMAIL]"
MASK_USER = "[USER]"
METRIC_PREFIX = "clean-"  # train-reply metric keys carrying the counts
MAX_PASSES = 8  # safety bound on passes to the fixed point; inputs seen need 1-3

ERR_UNKNOWN_RULE = ("config key 'clean': unknown cleaning rule(s) {rules}; valid rules: {valid}, "
                    "or 'all' (every rule), or '' (no cleaning)")
ERR_NOTHING_LEFT = "{file}: no rows left after cleaning (clean={spec}); every text was empty or invisible"


@dataclass(frozen=True)
class CleaningConfig:
    """Which cleaning rules are on (all off by default: cleaning is opt-in)."""

    unicode: bool = False  # NFC + mojibake repair
    whitespace: bool = False  # drop control/zero-width characters, collapse whitespace runs, strip
    urls: bool = False  # mask URLs as [URL]
    emails: bool = False  # mask e-mail addresses as [EMAIL]
    handles: bool = False  # mask @user handles as [USER]
    dedup: bool = False  # drop exact duplicates of (cleaned text, label), keep the first

    @classmethod
    def from_spec(cls, spec: str) -> CleaningConfig:
        """Parse the ``clean`` run-config value: ``"urls, emails"``, ``"all"`` or ``""`` (off).

        Names are case-insensitive; blanks around commas and empty items are ignored.

        Raises
        ------
        ValueError
            Naming every unknown rule and listing the valid ones.
        """
        names = [part.strip().lower() for part in str(spec).split(",") if part.strip()]
        unknown = [n for n in names if n not in RULES and n != "all"]
        if unknown:
            raise ValueError(ERR_UNKNOWN_RULE.format(rules=", ".join(repr(n) for n in unknown),
                                                     valid=", ".join(RULES)))
        if "all" in names:
            return cls(**dict.fromkeys(RULES, True))
        return cls(**{n: True for n in names})

    @property
    def rules(self) -> tuple[str, ...]:
        """Enabled rule names, in the order they are applied."""
        return tuple(f.name for f in fields(self) if getattr(self, f.name))

    @property
    def enabled(self) -> bool:
        return bool(self.rules)

    @property
    def spec(self) -> str:
        """The canonical ``clean`` value for this config (``from_spec(c.spec) == c``)."""
        return ",".join(self.rules)


# --------------------------------------------------------------------------------------------- unicode


def _byte_images() -> dict[str, int]:
    """Every character a single byte 0x80-0xFF turns into when decoded as Windows-1252 or Latin-1.

    Latin-1 maps byte b to U+00b; Windows-1252 differs only in 0x80-0x9F (``€``, ``’``, ``™``...) and
    leaves 0x81, 0x8D, 0x8F, 0x90, 0x9D undefined, which lenient decoders pass through as U+0081 etc.
    """
    images: dict[str, int] = {}
    for b in range(0x80, 0x100):
        images[chr(b)] = b
        try:
            images[bytes([b]).decode("cp1252")] = b
        except UnicodeDecodeError:
            pass
    return images


_TO_BYTE = _byte_images()
_CONT = "".join(sorted(re.escape(c) for c, b in _TO_BYTE.items() if 0x80 <= b <= 0xBF))
# The 8-bit image of one UTF-8 multi-byte sequence: a lead byte (0xC2-0xF4, the same characters in both
# encodings) followed by the images of as many continuation bytes (0x80-0xBF) as the lead byte announces.
_MOJIBAKE = re.compile(f"[\u00c2-\u00df][{_CONT}]|[\u00e0-\u00ef][{_CONT}]{{2}}|[\u00f0-\u00f4][{_CONT}]{{3}}")


def _markers(text: str) -> int:
    return sum(1 for _ in _MOJIBAKE.finditer(text))


def _decode_sequence(match: re.Match[str]) -> str:
    seq = match.group(0)
    try:
        return bytes(_TO_BYTE[c] for c in seq).decode("utf-8")
    except UnicodeDecodeError:  # not valid UTF-8 (e.g. an overlong form): not mojibake, keep it
        return seq


def fix_unicode(text: str) -> str:
    """NFC-normalise ``text`` and repair UTF-8-read-as-cp1252/latin-1 mojibake (see the module docstring).

    A repair is kept only when it lowers the number of mojibake sequences; that number strictly falls with
    every kept repair, so the loop ends, and its result is a fixed point (``fix_unicode`` is idempotent).
    """
    if text.isascii():
        return text
    text = unicodedata.normalize("NFC", text)
    markers = _markers(text)
    while markers:
        repaired = unicodedata.normalize("NFC", _MOJIBAKE.sub(_decode_sequence, text))
        after = _markers(repaired)
        if after >= markers:
            break
        text, markers = repaired, after
    return text


# --------------------------------------------------------------------------------------------- whitespace

_INVISIBLE_FORMAT = (
    "\u00ad"  # soft hyphen
    "\u180e"  # Mongolian vowel separator
    "\u200b"  # zero-width space
    "\u200e\u200f"  # left-to-right / right-to-left marks
    "\u202a\u202b\u202c\u202d\u202e"  # bidirectional embeddings and overrides
    "\u2060\u2061\u2062\u2063\u2064"  # word joiner, invisible operators
    "\u2066\u2067\u2068\u2069"  # bidirectional isolates
    "\ufeff"  # byte order mark / zero-width no-break space
)
# Control characters that are not whitespace (whitespace controls such as \t, \n, \x1c, \x85 are collapsed).
_DELETE = {cp: None for cp in range(0x00, 0xA0) if unicodedata.category(chr(cp)) == "Cc" and not chr(cp).isspace()}
_DELETE.update({ord(c): None for c in _INVISIBLE_FORMAT})


def fix_whitespace(text: str) -> str:
    """Remove control and invisible format characters, collapse whitespace runs to one space, strip."""
    return " ".join(text.translate(_DELETE).split())


# --------------------------------------------------------------------------------------------- masks

_EMAIL = r"[\w.%+-]+@[\w-]+(?:\.[\w-]+)+"
# Scheme or "www.", then anything up to whitespace; the last character is not trailing punctuation.
_URL = r"(?i:\b(?:https?://|ftp://|www\.))[^\s<>\"]*[^\s<>\"'.,;:!?)\]}]"
# Not after a word character (the middle of an e-mail address), a dot, "@" or a mask's closing bracket.
_HANDLE = r"(?<![\w.@\]])@\w+"
_MASKS = (("emails", _EMAIL, MASK_EMAIL), ("urls", _URL, MASK_URL), ("handles", _HANDLE, MASK_USER))


def _mask_pattern(config: CleaningConfig) -> re.Pattern[str] | None:
    parts = [f"(?P<{rule}>{pattern})" for rule, pattern, _ in _MASKS if getattr(config, rule)]
    return re.compile("|".join(parts)) if parts else None


_REPLACEMENT = {rule: mask for rule, _, mask in _MASKS}


def _apply_masks(text: str, pattern: re.Pattern[str], fired: set[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        rule = str(match.lastgroup)  # every alternative is a named group
        fired.add(rule)
        return _REPLACEMENT[rule]

    return pattern.sub(replace, text)


# --------------------------------------------------------------------------------------------- texts


def _clean_one(text: str, config: CleaningConfig, masks: re.Pattern[str] | None, fired: set[str]) -> str:
    """Apply the per-text rules in passes until nothing changes; add the names of rules that changed
    something to ``fired``."""
    for _ in range(MAX_PASSES):
        start = text
        if config.unicode:
            fixed = fix_unicode(text)
            if fixed != text:
                fired.add("unicode")
                text = fixed
        if config.whitespace:
            fixed = fix_whitespace(text)
            if fixed != text:
                fired.add("whitespace")
                text = fixed
        if masks is not None:
            text = _apply_masks(text, masks, fired)
        if text == start:
            break
    return text


def clean_text(text: str, *, config: CleaningConfig) -> str:
    """One text through the per-text rules of ``config`` (``dedup`` is a dataset rule and is ignored)."""
    return _clean_one(text, config, _mask_pattern(config), set())


# --------------------------------------------------------------------------------------------- datasets


def clean_dataset(ds: TextDataset, *, config: CleaningConfig) -> tuple[TextDataset, dict[str, Any]]:
    """Clean every text of ``ds``; return the cleaned dataset and counts of what each rule did.

    Labels and groups stay aligned with their texts; removed rows (emptied by ``whitespace``, duplicates
    dropped by ``dedup``) disappear from all three.

    Returns
    -------
    (TextDataset, dict)
        The counts: ``rows_in``, ``rows_out`` and, per enabled rule, ``{"changed": rows whose text the rule
        changed, "removed": rows the rule removed}`` (a row emptied by ``whitespace`` counts as removed only;
        ``changed`` is counted before ``dedup``); ``dedup`` also has ``conflicting_labels``, the number of
        distinct kept texts that carry more than one label.

    Raises
    ------
    DataError
        When no row is left.
    """
    counts: dict[str, Any] = {"rows_in": len(ds)}
    per_rule = {rule: {"changed": 0, "removed": 0} for rule in config.rules}
    masks = _mask_pattern(config)
    keep: list[int] = []
    texts: list[str] = []
    for i, text in enumerate(ds.texts):
        fired: set[str] = set()
        cleaned = _clean_one(text, config, masks, fired)
        if not cleaned:  # only the whitespace rule can empty a text (rows are non-blank when read)
            per_rule["whitespace"]["removed"] += 1
            continue
        for rule in fired:
            per_rule[rule]["changed"] += 1
        keep.append(i)
        texts.append(cleaned)
    labels = [int(y) for y in ds.labels[keep]] if keep else []
    if config.dedup:
        seen: set[tuple[str, int]] = set()
        unique: list[int] = []
        for j, key in enumerate(zip(texts, labels, strict=True)):
            if key not in seen:
                seen.add(key)
                unique.append(j)
        per_rule["dedup"]["removed"] = len(texts) - len(unique)
        keep = [keep[j] for j in unique]
        texts = [texts[j] for j in unique]
        labels = [labels[j] for j in unique]
        per_text = Counter(texts)  # (text, label) pairs are now unique: a text counted twice has two labels
        per_rule["dedup"]["conflicting_labels"] = sum(1 for c in per_text.values() if c > 1)
    if not texts:
        raise DataError([ERR_NOTHING_LEFT.format(file=ds.source or "dataset", spec=config.spec)])
    counts["rows_out"] = len(texts)
    counts.update(per_rule)
    cleaned_ds = TextDataset(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=ds.label_names,
        groups=None if ds.groups is None else [ds.groups[i] for i in keep],
        source=ds.source,
        meta={**ds.meta, "cleaning": counts},
    )
    return cleaned_ds, counts


# --------------------------------------------------------------------------------------------- reporting


def counts_to_metrics(counts: Mapping[str, Any]) -> dict[str, int]:
    """Flatten counts into metric keys for a Flower ``MetricRecord``: ``clean-rows-in``,
    ``clean-<rule>-changed``, ``clean-<rule>-removed``, ``clean-dedup-conflicting-labels``."""
    out: dict[str, int] = {}
    for key, value in counts.items():
        if isinstance(value, Mapping):
            for sub, n in value.items():
                out[f"{METRIC_PREFIX}{key}-{sub.replace('_', '-')}"] = int(n)
        else:
            out[f"{METRIC_PREFIX}{key.replace('_', '-')}"] = int(value)
    return out


def split_cleaning_metrics(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Split a train reply's metrics into (the other metrics, the cleaning counts or None).

    Inverse of :func:`counts_to_metrics`; keys it does not know are left with the other metrics.
    """
    rest: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for key, value in metrics.items():
        name = key.removeprefix(METRIC_PREFIX) if key.startswith(METRIC_PREFIX) else None
        if name in ("rows-in", "rows-out"):
            counts[name.replace("-", "_")] = int(value)
            continue
        rule, _, field = (name or "").partition("-")
        if rule in RULES and field:
            counts.setdefault(rule, {})[field.replace("-", "_")] = int(value)
            continue
        rest[key] = value
    return rest, (counts or None)
