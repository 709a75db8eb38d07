"""Composition specs: YAML in, validated models out, errors that point at the bad field."""

from __future__ import annotations

import pytest

from mergeserve.spec import SpecError, load_composition, load_serve_config, parse_composition

GOOD = """
name: demo
base: base
experts:
  - {name: code, source: experts/code, prompts: ["def f(): pass"]}
  - {name: math, source: experts/math, prompts: ["2 + 2 = 4"]}
router: {kind: hidden, top_k: 2}
"""


def test_a_spec_file_resolves_sources_relative_to_itself(tmp_path):
    (tmp_path / "moe.yaml").write_text(GOOD)
    spec = load_composition(tmp_path / "moe.yaml")
    assert spec.base == str(tmp_path / "base")
    assert spec.experts[1].source == str(tmp_path / "experts" / "math")
    assert spec.router.top_k == 2 and spec.method == "btx"


def test_specs_can_share_an_experts_file_whose_sources_are_relative_to_it(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "experts.yaml").write_text("- {name: code, source: ../zoo/code, prompts: [x]}\n")
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "moe.yaml").write_text("name: m\nbase: base\nexperts: ../shared/experts.yaml\n")
    spec = load_composition(tmp_path / "specs" / "moe.yaml")
    assert spec.experts[0].source == str(tmp_path / "zoo" / "code")
    assert spec.base == str(tmp_path / "specs" / "base")
    (tmp_path / "shared" / "experts.yaml").write_text("name: not a list\n")
    with pytest.raises(SpecError, match="experts.yaml: an experts file must be a YAML list"):
        load_composition(tmp_path / "specs" / "moe.yaml")


@pytest.mark.parametrize("change, message", [
    ({"router": {"top_k": 0}}, "router.top_k: Input should be greater than or equal to 1"),
    ({"router": {"kind": "psychic"}}, "router.kind: Input should be 'hidden', 'centroid', 'arrow', 'smile', 'learned', 'random', 'perplexity' or 'task_vector'"),
    ({"experts": []}, "experts: give at least one"),
    ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ({"router": {"top_k": 3}}, "router.top_k=3 exceeds the 2 experts"),
    ({"experts": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}], "router": {"kind": "random"}},
     "expert names must be unique"),
    ({"experts": [{"name": "a", "source": "x"}, {"name": "b", "source": "y", "prompts": ["hi"]}]},
     "needs prompts for every expert; none for ['a']"),
])
def test_errors_name_the_bad_field(change, message):
    import yaml

    data = yaml.safe_load(GOOD) | change
    with pytest.raises(SpecError) as err:
        parse_composition(data, origin="moe.yaml")
    assert message in str(err.value) and str(err.value).startswith("moe.yaml")


def test_a_serve_config_reads_specs_by_path(tmp_path):
    (tmp_path / "moe.yaml").write_text(GOOD)
    (tmp_path / "serve.yaml").write_text("port: 8123\ncompositions: [moe.yaml]\nengine: {max_num_seqs: 4}\n")
    config = load_serve_config(tmp_path / "serve.yaml")
    assert config.port == 8123 and config.engine.max_num_seqs == 4
    assert config.compositions[0].name == "demo"


def test_broken_yaml_is_refused_with_the_file_name(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="bad.yaml: not valid YAML"):
        load_composition(tmp_path / "bad.yaml")
