"""Each domain's second held-out set: texts from other sources, problems in other phrasings (issue 26).

The first held-out sets are cut from training's own distribution (the same library, handbook and
templates), so they cannot tell a router or expert that generalises from one that learned its
training split. These share no file, document or template with training:
- code: the `click` package's source (BSD-3-Clause), docstrings and comments stripped as for
  the standard library;
- german: the GIMP user manual's German edition (Debian package gimp-help-de, GNU FDL), a topic
  the Debian handbook never touches;
- math: `math_other`'s problems, whose templates were written apart from training's without
  reading them; a problem sharing its worked arithmetic with a training problem is dropped.

Each also has a smaller dev set from the same other source (other files, other pages, another
seed), apart from the scored set: what a learned router may stop early on, so that stopping
does not choose on the very texts it is scored on.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mergeserve.zoo import build_dir, code_data, german_data, math_data, math_other
from mergeserve.zoo.splits import Example, chunk, other_path, split_units, write_jsonl

HELDOUT_CHARS = 90_000
DEV_CHARS = 30_000
MAX_FILE_CHARS = 40_000
SEED = "zoo-other-v1"
GIMP_PACKAGE = "gimp-help-de"
GIMP_HELP = Path("usr/share/gimp/2.0/help/de")
MATH_COUNT, MATH_DEV_COUNT, MATH_DEV_SEED = 200, 64, 8

Split = tuple[list[Example], list[Example]]  # the scored set, the dev set


def by_unit(sizes: dict[str, int], examples: Callable[[str], list[Example]]) -> Split:
    """The examples of the units (files, pages) of the scored set, and of the dev set from the
    rest; each set's units in sorted order."""
    held = split_units(sizes, SEED, HELDOUT_CHARS, MAX_FILE_CHARS)
    dev = split_units({n: size for n, size in sizes.items() if n not in held}, SEED + "-dev", DEV_CHARS, MAX_FILE_CHARS)
    return [e for n in sorted(held) for e in examples(n)], [e for n in sorted(dev) for e in examples(n)]


def code() -> Split:
    import click

    files = code_data.source_files(Path(click.__file__).parent.parent)
    files = {name: text for name, text in files.items() if name.startswith("click/")}
    return by_unit({n: len(t) for n, t in files.items()}, lambda n: [
        {"source": n, "text": c} for c in chunk(code_data.blocks(code_data.strip_prose(files[n])), code_data.CHUNK_CHARS, "\n\n\n")])


def gimp_help_dir() -> Path:
    """The manual installed, or unpacked from its .deb under build/zoo/debs (apt-get download: no
    dependencies, no browser)."""
    if (installed := Path("/") / GIMP_HELP).is_dir():
        return installed
    unpacked = build_dir() / "debs" / GIMP_PACKAGE
    if not (unpacked / GIMP_HELP).is_dir():
        raise german_data.MissingHandbook(f"no German GIMP manual: run `apt-get download {GIMP_PACKAGE}` and "
                                          f"`dpkg-deb -x {GIMP_PACKAGE}_*.deb {unpacked}` (or `make zoo-other`)")
    return unpacked / GIMP_HELP


def german() -> Split:
    pages = sorted(gimp_help_dir().glob("*.html"))
    texts = {p.name: german_data.page_paragraphs(p.read_text(encoding="utf-8")) for p in pages}
    return by_unit({n: sum(map(len, paras)) for n, paras in texts.items()},
                   lambda n: [{"source": n, "text": c} for c in chunk(texts[n], german_data.CHUNK_CHARS, "\n\n")])


def math() -> Split:
    train, _ = math_data.build()
    keys = {math_data.arithmetic_key(e) for e in train}
    scored = [e for e in math_other.build(MATH_COUNT * 2) if math_data.arithmetic_key(e) not in keys][:MATH_COUNT]
    seen = keys | {math_data.arithmetic_key(e) for e in scored}
    dev = [e for e in math_other.build(MATH_DEV_COUNT * 2, seed=MATH_DEV_SEED) if math_data.arithmetic_key(e) not in seen]
    return scored, dev[:MATH_DEV_COUNT]


BUILDERS = {"code": code, "german": german, "math": math}


def write_other(domain: str) -> tuple[int, int]:
    scored, dev = BUILDERS[domain]()
    write_jsonl(other_path(domain), scored)
    write_jsonl(other_path(domain, "other_dev"), dev)
    return len(scored), len(dev)
