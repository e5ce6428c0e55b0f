"""Markdown reports to standalone HTML pages, rendered by markdown-it-py (CommonMark plus tables).

Every HTML report fedpriv writes (the run report, the audit report, the compress report) is its Markdown
report passed through :func:`markdown_to_html`, so the two never disagree and nothing is parsed by hand.
Raw HTML in the Markdown is not passed through: it is shown as text, so a node name or a refusal reason
(strings that come from other parties) cannot inject markup. Text from other parties that goes into Markdown
is escaped with :func:`md_escape` first so that it reads as written.
"""

from __future__ import annotations

import html
import re

from markdown_it import MarkdownIt

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em;
       color: #1a1a1a; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f4f4f4; } td { text-align: right; white-space: nowrap; }
td:first-child { text-align: left; } td:last-child { white-space: normal; }
code { background: #f4f4f4; padding: 0 3px; border-radius: 3px; }
pre { background: #f4f4f4; padding: 0.6em; overflow-x: auto; }
img { max-width: 100%; }
"""

# ASCII punctuation that can start or end Markdown syntax (CommonMark lets any of it be backslash-escaped).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|#!~&])")


def _renderer() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": False, "typographer": False}).enable("table")


def md_escape(text: object) -> str:
    """``text`` as Markdown inline content that renders to exactly ``str(text)`` (table pipes included)."""
    return _MD_SPECIAL.sub(r"\\\1", str(text)).replace("\n", " ")


def markdown_to_html(md: str, *, title: str) -> str:
    """Render Markdown (CommonMark + pipe tables) to a standalone UTF-8 HTML page titled ``title``.

    Parameters
    ----------
    md : str
        The report's Markdown; relative image and link targets stay relative to the HTML file.
    title : str
        Plain text for the page's ``<title>`` (escaped).

    Returns
    -------
    str
        The whole page.
    """
    body = _renderer().render(md)
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>\n<body>\n{body}</body></html>\n")
