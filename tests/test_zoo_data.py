"""The expert zoo's data splits: deterministic, disjoint by source unit, clean text."""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest

from mergeserve.zoo import code_data, german_data, math_data, math_story, other_sets
from mergeserve.calibration import read_jsonl
from mergeserve.zoo.splits import chunk, heldout_path, other_path, split_units

PAGE = """<html><head><title>Kapitel 1</title></head><body>
<div id="banner"><a>Download the ebook</a></div><ul class="docnav"><li>Zurück</li></ul>
<div class="para">Die Datei <code>/etc/apt/sources.list</code> listet die Quellen auf, die für das System
 verwendet werden.</div><a class="indexterm" id="x"></a>
<pre class="screen">$ apt update und die Pakete</pre>
<div class="para">This paragraph is still in English and is dropped by the filter.</div>
<div class="para">Es ist nicht schwer, mit der Konsole zu arbeiten.<br/>Sie wird oft genutzt.</div>
</body></html>"""


def test_html_keeps_german_prose_only() -> None:
    assert german_data.page_paragraphs(PAGE) == [
        "Die Datei /etc/apt/sources.list listet die Quellen auf, die für das System verwendet werden.",
        "Es ist nicht schwer, mit der Konsole zu arbeiten.",
        "Sie wird oft genutzt.",
    ]


def test_german_split_is_by_page_and_deterministic(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"sect.{i}.html").write_text(PAGE.replace("Kapitel 1", f"Kapitel {i}"))
    (tmp_path / "index.html").write_text(PAGE)
    train, heldout = german_data.build(tmp_path, heldout_chars=2_000)
    assert heldout and train
    assert not {e["source"] for e in train} & {e["source"] for e in heldout}
    assert "index.html" not in {e["source"] for e in train + heldout}
    assert german_data.build(tmp_path, heldout_chars=2_000) == (train, heldout)


def test_missing_handbook_says_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(german_data.MissingHandbook, match="apt-get install debian-handbook"):
        german_data.build(tmp_path / "nowhere")


def test_code_split_excludes_tests_and_holds_out_whole_files(tmp_path: Path) -> None:
    for name in ["a.py", "b.py", "pkg/__init__.py", "pkg/c.py", "test/test_a.py", "pkg/tests/t.py", "idlelib/x.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"import os\n\n\ndef f():\n    return '{name}'\n\n\nclass C:\n    pass\n")
    train, heldout = code_data.build(tmp_path, heldout_chars=200)
    sources = {e["source"] for e in train + heldout}
    assert sources == {"a.py", "b.py", "pkg/__init__.py", "pkg/c.py"}
    assert heldout and train
    assert not {e["source"] for e in train} & {e["source"] for e in heldout}


def test_code_blocks_cut_before_top_level_definitions() -> None:
    source = "import os\n\n\n@decorator\ndef f():\n    x = 1\n\n    def inner():\n        pass\n\n\nclass C:\n    pass\n"
    assert code_data.blocks(source) == ["import os", "@decorator\ndef f():\n    x = 1\n\n    def inner():\n        pass", "class C:\n    pass"]


def test_code_keeps_the_code_and_drops_docstrings_and_comments() -> None:
    source = (
        '"""Module docstring."""\n\nimport os  # why os\n\n\n'
        'class Protocol:\n    """Only a docstring."""\n\n\n'
        'def f(x):\n    """Says what f does.\n\n    At length.\n    """\n\n    # a comment line\n'
        '    text = "# not a comment"\n    return x  # trailing\n'
    )
    stripped = code_data.strip_prose(source)
    assert stripped == (
        'import os\n\n\nclass Protocol:\n    pass\n\n\n'
        'def f(x):\n    text = "# not a comment"\n    return x'
    )
    ast.parse(stripped)


def test_split_units_respects_budget_and_size_cap() -> None:
    units = {f"u{i}": 100 for i in range(50)} | {"huge": 10_000}
    held = split_units(units, "seed", heldout_chars=1_000, max_unit_chars=500)
    assert len(held) == 10 and "huge" not in held
    assert held == split_units(units, "seed", 1_000, 500)
    assert held != split_units(units, "other seed", 1_000, 500)


def test_chunk_is_greedy_and_keeps_long_parts_whole() -> None:
    assert chunk(["aa", "bb", "cccccc", "d"], 5, "-") == ["aa-bb", "cccccc", "d"]


def test_math_answers_follow_from_the_worked_steps() -> None:
    train, heldout = math_data.build()
    assert len(heldout) == math_data.HELDOUT_SIZE and len(train) == math_data.TRAIN_SIZE + math_data.STORY_SIZE
    assert not {e["question"] for e in train} & {e["question"] for e in heldout}
    for e in heldout + train[:500] + train[-500:]:
        lines = e["text"].splitlines()
        assert lines[0] == f"Question: {e['question']}" and lines[-1] == f"Answer: {e['answer']}"
        for line in lines[1:-1]:  # every "a op b = c" in the steps is right
            for expression, result in re.findall(r"((?:\d+ [-+*/] )+\d+) = (\d+)", line):
                assert eval(expression) == int(result), line
        assert lines[-2].rstrip(".").split(" = ")[-1].split()[0] == e["answer"]
    assert math_data.build() == (train, heldout)


def test_math_heldout_shares_no_worked_arithmetic_with_training() -> None:
    train, heldout = math_data.build()
    keys = {math_data.arithmetic_key(e) for e in train}
    assert not any(math_data.arithmetic_key(e) in keys for e in heldout)
    assert math_data.arithmetic_key(heldout[0]) == ((4, "*", 12), (6, "*", 6), (48, "+", 36))
    assert all(len(math_data.arithmetic_key(e)) >= 2 for e in train + heldout)  # every step's sum is read
    # Training is what the committed math expert was trained on, byte for byte: the templated
    # problems as before issue 26, then the composed stories.
    def digest(examples):
        return hashlib.sha256("".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in examples).encode()).hexdigest()
    assert digest(train[:math_data.TRAIN_SIZE]) == "c7a7ee52d24c3c4f6f8ffe8c3f2776c6f1a7701dcfdf68ca19923dfc7af2a414"
    assert digest(train) == "d1d0e573224766b42d32552c0831b88b500bfb89261af67ea6581a5281510873"
    assert read_jsonl(heldout_path("math")) == heldout  # the committed file is what build() writes


def test_stories_chain_two_or_more_steps_in_many_phrasings() -> None:
    drawn = list(islice(math_data.problem_stream(math_story.SHAPES, 0), 2000))
    problems, shapes = [e for _, e in drawn], Counter(name for name, _ in drawn)
    assert set(shapes) == {"chain", "change", "compare", "rate", "people"}
    assert all(2 <= len(math_data.arithmetic_key(e)) <= 4 for e in problems)
    openings = Counter(e["question"].split()[0] for e in problems)
    assert len(openings) > 30  # names, "How", "Work", "Read", "Each", ...: no one sentence shape


def test_other_sets_share_nothing_with_training() -> None:
    """The second held-out sets: other sources (click, the GIMP manual) and math_other's problems."""
    train, _ = math_data.build()
    other = read_jsonl(other_path("math"))
    assert (other, read_jsonl(other_path("math", "other_dev"))) == other_sets.math() and len(other) == other_sets.MATH_COUNT
    keys = {math_data.arithmetic_key(e) for e in train}
    assert not any(math_data.arithmetic_key(e) in keys for e in other)
    assert not {e["question"] for e in other} & {e["question"] for e in train}
    code, code_dev = read_jsonl(other_path("code")), read_jsonl(other_path("code", "other_dev"))
    assert code and all(e["source"].startswith("click/") for e in code + code_dev)
    assert not {e["source"] for e in code} & {e["source"] for e in code_dev}  # other files of the library
    german = read_jsonl(other_path("german"))
    assert german and all(e["source"].endswith(".html") for e in german)  # pages of the manual


def test_drill_asks_bare_sums_each_worked_right_and_apart_from_the_held_out_set() -> None:
    heldout = read_jsonl(heldout_path("math"))
    drill = math_data.drill(heldout, 2000)
    assert drill == math_data.drill(heldout, 2000)  # seeded
    keys = {math_data.arithmetic_key(e) for e in heldout}
    for e in drill:
        lines = e["text"].splitlines()
        assert lines[0] == f"Question: {e['question']}" and lines[-1] == f"Answer: {e['answer']}"
        steps = re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)\.", "\n".join(lines[1:-1]))
        assert len(steps) == len(lines) - 2 and steps[-1][3] == e["answer"]
        assert all(eval(f"{a} {op} {b}") == int(c) for a, op, b, c in steps)
        assert math_data.arithmetic_key(e) not in keys
    differences = [e for e in drill if len(math_data.arithmetic_key(e)) == 1 and math_data.arithmetic_key(e)[0][1] == "-"]
    assert sum(int(a) % 10 < int(b) % 10 for (a, _, b), in map(math_data.arithmetic_key, differences)) > len(differences) // 3  # borrows
