"""German prose from the Debian Administrator's Handbook (Debian package `debian-handbook`, de-DE HTML).

The translation is incomplete: many paragraphs are still English, so each paragraph is kept
only when it has more German than English function words. Split by HTML file (chapter or section).
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

from mergeserve.zoo.splits import Example, chunk, split_units

HANDBOOK_DIR = Path("/usr/share/doc/debian-handbook/html/de-DE")
INSTALL_HINT = "apt-get install debian-handbook  (Debian/Ubuntu; `make zoo` runs it when root)"
SEED = "zoo-german-v1"
HELDOUT_CHARS = 90_000
MAX_HELDOUT_FILE_CHARS = 25_000
CHUNK_CHARS = 800
SKIPPED_FILES = {"index.html"}  # the table of contents
BLOCK_TAGS = {"div", "p", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "table", "tr", "td", "th", "br", "blockquote"}
SKIPPED_TAGS = {"head", "pre", "script", "style"}  # pre holds shell sessions and config files
SKIPPED_CLASSES = {"docnav", "indexterm", "toc"}
SKIPPED_IDS = {"banner", "title"}
GERMAN_WORDS = set("der die das und ist nicht mit sich des den dem ein eine einen einer es auf für von zu im auch wird werden kann können sie wir oder wenn bei aus nach über zum zur sind als wie dass nur noch diese dieser".split())
ENGLISH_WORDS = set("the and is not with of to in a an it on for from be can you we or if at as are this that which by these have has will".split())
WORD = re.compile(r"[a-zäöüß]+")


class MissingHandbook(RuntimeError):
    pass


class ProseExtractor(HTMLParser):
    """Paragraph texts of one handbook page, without navigation, index anchors or code blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buffer: list[str] = []
        self._skip: list[str] = []  # open tags of the subtree being skipped, innermost last

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip:
            self._skip.append(tag)
            return
        a = dict(attrs)
        if tag in SKIPPED_TAGS or a.get("id") in SKIPPED_IDS or SKIPPED_CLASSES & set((a.get("class") or "").split()):
            self._skip.append(tag)
        elif tag in BLOCK_TAGS:
            self._flush()

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._skip and tag in BLOCK_TAGS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            # Pop back to the matching open tag (void tags such as <img> never close).
            while self._skip and self._skip.pop() != tag:
                pass
        elif tag in BLOCK_TAGS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._buffer.append(data)

    def close(self) -> None:
        super().close()
        self._flush()

    def _flush(self) -> None:
        text = " ".join("".join(self._buffer).split())
        self._buffer = []
        if text:
            self.paragraphs.append(text)


def is_german(paragraph: str) -> bool:
    words = WORD.findall(paragraph.lower())
    german = sum(w in GERMAN_WORDS for w in words)
    return german > sum(w in ENGLISH_WORDS for w in words)


def page_paragraphs(html: str) -> list[str]:
    parser = ProseExtractor()
    parser.feed(html)
    parser.close()
    return [p for p in parser.paragraphs if is_german(p)]


def build(root: Path = HANDBOOK_DIR, heldout_chars: int = HELDOUT_CHARS) -> tuple[list[Example], list[Example]]:
    pages = sorted(p for p in root.glob("*.html") if p.name not in SKIPPED_FILES) if root.is_dir() else []
    if not pages:
        raise MissingHandbook(f"no German Debian handbook HTML in {root}: install it with {INSTALL_HINT}")
    texts = {p.name: page_paragraphs(p.read_text(encoding="utf-8")) for p in pages}
    sizes = {name: sum(map(len, paras)) for name, paras in texts.items()}
    held = split_units(sizes, SEED, heldout_chars, MAX_HELDOUT_FILE_CHARS)
    train, heldout = [], []
    for name, paras in texts.items():
        examples = [{"source": name, "text": c} for c in chunk(paras, CHUNK_CHARS, "\n\n")]
        (heldout if name in held else train).extend(examples)
    return train, heldout
