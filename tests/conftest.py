"""Shared fixtures: one tiny BERT per train part and one tokenizer per test session, Flower imported once.

Building a model is cheap once ``transformers`` is imported, but the first build and the tokenizer cost
seconds; tests take deep copies of session-built models so no test sees another test's training.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

LABELS = ("negative", "positive")


@pytest.fixture(scope="session")
def flower():
    """``flwr.app``, imported with its known import-time warnings silenced (click deprecations in typer).

    Flower imports typer, which imports ``click.utils.get_text_stream`` / ``get_binary_stream`` (deprecated in
    click 8.5); under ``filterwarnings = error`` that would fail whichever test imports Flower first.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"'click\.utils\.\w+' is deprecated", category=DeprecationWarning)
        import flwr.app
        import flwr.serverapp.strategy  # noqa: F401
    return flwr.app


@pytest.fixture(scope="session")
def tokenizer():
    from common.model import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="session")
def _model_cache():
    return {}


@pytest.fixture(scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core box two OpenMP threads spin-wait and
    make a 0.5 s training loop take 25 s of CPU. One thread for the whole session once models are in use."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def make_model(_model_cache, _one_torch_thread):
    """``make_model(train_part, top_k_layers=0, dropout=True)`` -> a fresh copy of a session-built tiny BERT.

    ``dropout=False`` sets every dropout probability to 0, for tests that compare two training paths
    step for step (dropout draws from the global RNG).
    """
    from common.model import ModelSpec, build_model

    def make(train_part: str = "head", top_k_layers: int = 0, *, dropout: bool = True):
        key = (train_part, top_k_layers)
        if key not in _model_cache:
            with warnings.catch_warnings():
                # peft reads model.is_gradient_checkpointing, deprecated in transformers 5 (FutureWarning).
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                _model_cache[key] = build_model(
                    ModelSpec("tiny", LABELS, train_part=train_part, top_k_layers=top_k_layers)
                )
        model = copy.deepcopy(_model_cache[key])
        if not dropout:
            import torch

            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
        return model

    return make


@pytest.fixture(scope="session")
def toy_texts():
    """A learnable two-class toy set: the label is decided by one sentiment word per sentence."""
    pos = ["great", "excellent", "wonderful", "superb"]
    neg = ["terrible", "awful", "dreadful", "useless"]
    subjects = ["the staff", "the service", "the visit", "the app"]
    texts, labels = [], []
    for i, s in enumerate(subjects):
        for j in range(4):
            texts.append(f"{s} was {pos[(i + j) % 4]}")
            labels.append(1)
            texts.append(f"{s} was {neg[(i + j) % 4]}")
            labels.append(0)
    return texts, np.asarray(labels, dtype=np.int64)


@pytest.fixture(scope="session")
def toy_encoded(tokenizer, toy_texts):
    from common.data import TextDataset, encode

    texts, labels = toy_texts
    ds = TextDataset(texts=texts, labels=labels, label_names=list(LABELS))
    return encode(ds, tokenizer, max_length=16)


@pytest.fixture
def server_task(monkeypatch, flower):
    """What Flower's runtime sets in a ServerApp process before messages can be created (Message() reads it):
    lets tests drive server.loop.run_federation and the ClientApp handlers in-process, without Ray."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


# Markdown that must never reach a reader of an HTML report: code spans, link/image syntax, bold.
RAW_MARKDOWN = ("`", "](", "**")


def html_problems(path) -> list[str]:
    """Why the HTML file at ``path`` would not read right in a browser: an ``<img src>`` or ``<a href>`` whose
    target does not exist (relative to the file; external and fragment links are not followed), or raw
    Markdown (``RAW_MARKDOWN``) in the visible text. Empty when the page is fine."""
    from html.parser import HTMLParser
    from pathlib import Path
    from urllib.parse import unquote, urlsplit

    path = Path(path)

    class _Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.targets: list[tuple[str, str]] = []
            self.text: list[str] = []
            self._skip = 0

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag in ("style", "script", "title"):
                self._skip += 1
            if tag == "img":
                self.targets.append(("img src", a.get("src") or ""))
            elif tag == "a" and "href" in a:
                self.targets.append(("a href", a.get("href") or ""))

        def handle_endtag(self, tag):
            if tag in ("style", "script", "title"):
                self._skip -= 1

        def handle_data(self, data):
            if not self._skip:
                self.text.append(data)

    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    problems = []
    for kind, target in page.targets:
        url = urlsplit(target)
        if url.scheme in ("http", "https", "mailto") or (not url.path and url.fragment):
            continue
        if not url.path or url.scheme not in ("", "file") or not (path.parent / unquote(url.path)).is_file():
            problems.append(f"{path.name}: {kind}={target!r} does not resolve to a file")
    text = "".join(page.text)
    for token in RAW_MARKDOWN:
        at = text.find(token)
        if at >= 0:
            problems.append(f"{path.name}: raw Markdown {token!r} in the text: ...{text[max(0, at - 40):at + 40]!r}...")
    return problems


@pytest.fixture(scope="session")
def check_html():
    """:func:`html_problems`, for tests that write an HTML report."""
    return html_problems
