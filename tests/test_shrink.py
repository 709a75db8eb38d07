"""`mergeserve shrink`: fewer experts from routing statistics, each group one exact rank-sum adapter."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from tiny import CORPUS

from mergeserve.cli import main
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.learn.shrink import RoutingStats, group_experts, merged_deltas, task_vector_similarity
from mergeserve.spec import load_composition
from mergeserve.zoo.splits import write_jsonl


def moe_spec(base, experts: dict, **router) -> dict:
    return {"name": "moe", "base": str(base), "router": {"kind": "random", "top_k": 2, **router},
            "experts": [{"name": n, "source": str(p), "prompts": [f"{n} text"]} for n, p in experts.items()]}


def test_the_most_used_experts_lead_and_the_rest_join_the_most_similar():
    stats = RoutingStats(torch.tensor([0.5, 0.1, 0.3, 0.1]), torch.tensor([
        [1.0, 0.2, 0.1, 0.9],
        [0.2, 1.0, 0.8, 0.0],
        [0.1, 0.8, 1.0, 0.3],
        [0.9, 0.0, 0.3, 1.0],
    ]))
    assert group_experts(stats, 2) == [[0, 3], [1, 2]]
    assert group_experts(stats, 1) == [[0, 1, 2, 3]]


def test_a_merged_group_is_the_usage_weighted_sum_of_its_deltas(zoo, adapters):
    pool = ExpertPool()
    math_, code = (pool.get_expert(str(adapters[n]), str(zoo["base"])).factored for n in ("math", "code"))
    merged = merged_deltas([math_, code], [0.75, 0.25])
    key = "model.layers.0.mlp.up_proj.weight"
    expected = merged[key].base + 0.75 * (math_[key].dense() - math_[key].base) + 0.25 * (code[key].dense() - code[key].base)
    torch.testing.assert_close(merged[key].dense(), expected, atol=1e-5, rtol=0)
    assert merged[key].rank == math_[key].rank + code[key].rank


def test_task_vector_similarity_from_factors_equals_the_dense_cosine(zoo, adapters):
    pool = ExpertPool()
    deltas = [pool.get_expert(str(adapters[n]), str(zoo["base"])).factored for n in ("math", "code")]
    dense = [torch.cat([(d[k].dense() - d[k].base).flatten() for k in sorted(set(deltas[0]) | set(deltas[1])) if k in d]) for d in deltas]
    # the cosine over the keys both adapt, with each vector's norm over all its own keys
    shared = sorted(set(deltas[0]) & set(deltas[1]))
    dot = sum(float(((deltas[0][k].dense() - deltas[0][k].base) * (deltas[1][k].dense() - deltas[1][k].base)).sum()) for k in shared)
    expected = dot / (float(dense[0].norm()) * float(dense[1].norm()))
    assert float(task_vector_similarity(deltas)[0, 1]) == pytest.approx(expected, rel=1e-4)


def test_cli_shrinks_three_experts_to_two_and_to_one(zoo, adapters, tmp_path, capsys):
    spec = tmp_path / "moe.yaml"
    spec.write_text(yaml.safe_dump(moe_spec(zoo["base"], adapters)))
    write_jsonl(tmp_path / "calib.jsonl", [{"text": t} for t in CORPUS[:8]])
    for n in (2, 1):
        out = tmp_path / f"to{n}"
        assert main(["shrink", "--spec", str(spec), "--to", str(n), "--out", str(out), "--data", str(tmp_path / "calib.jsonl"),
                     "--samples", "2", "--seq-len", "32", "--threads", "1"]) == 0
        shrunk = load_composition(out / "spec.yaml")
        assert len(shrunk.experts) == n and sorted("-".join(e.name for e in shrunk.experts).split("-")) == sorted(adapters)
        composed = build(shrunk, ExpertPool())
        assert composed.num_experts == n
        config = json.loads((out / shrunk.experts[0].name / "adapter_config.json").read_text())
        assert config["lora_alpha"] == config["r"]  # scale 1: the usage weights and scalings live in B
    assert "wrote" in capsys.readouterr().out


def test_merge_sum_keeps_every_members_whole_delta(zoo, adapters, tmp_path):
    spec = tmp_path / "moe.yaml"
    spec.write_text(yaml.safe_dump(moe_spec(zoo["base"], adapters)))
    write_jsonl(tmp_path / "calib.jsonl", [{"text": t} for t in CORPUS[:8]])
    out = tmp_path / "to1"
    assert main(["shrink", "--spec", str(spec), "--to", "1", "--out", str(out), "--data", str(tmp_path / "calib.jsonl"),
                 "--samples", "2", "--seq-len", "32", "--threads", "1", "--merge", "sum"]) == 0
    pool = ExpertPool()
    merged = pool.get_expert(str(out / load_composition(out / "spec.yaml").experts[0].name), str(zoo["base"])).factored
    members = [pool.get_expert(str(p), str(zoo["base"])).factored for p in adapters.values()]
    key = next(k for k in merged if all(k in m for m in members))
    expected = merged[key].base + sum(m[key].dense() - m[key].base for m in members)
    torch.testing.assert_close(merged[key].dense(), expected, atol=1e-4, rtol=0)


def test_a_dense_expert_is_refused(zoo, adapters, tmp_path, capsys):
    spec = tmp_path / "moe.yaml"
    spec.write_text(yaml.safe_dump(moe_spec(zoo["base"], {"math": adapters["math"], "code": zoo["code"]})))
    (tmp_path / "c.txt").write_text(CORPUS[0])
    assert main(["shrink", "--spec", str(spec), "--to", "1", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "c.txt")]) == 2
    err = capsys.readouterr().err
    assert "expert 'code'" in err and "this one is dense" in err


def test_cli_shrinks_from_a_live_servers_metrics(zoo, adapters, tmp_path):
    """Usage from the server's expert_tokens_total, similarity from the task vectors."""
    from live import live_server
    from tiny import engine_for

    from mergeserve.engine.executor import Executor
    from mergeserve.server import Registry, create_app
    from mergeserve.server.backends.local import LocalBackend
    from mergeserve.spec import parse_composition

    spec = tmp_path / "moe.yaml"
    spec.write_text(yaml.safe_dump(moe_spec(zoo["base"], adapters)))
    executor = Executor()
    engine = engine_for(parse_composition(moe_spec(zoo["base"], adapters)), max_model_len=128)
    with live_server(create_app(Registry([LocalBackend(engine, executor)]), executor)) as url:
        import httpx

        httpx.post(f"{url}/v1/completions", json={"model": "moe", "prompt": CORPUS[0], "max_tokens": 4}, timeout=30).raise_for_status()
        assert main(["shrink", "--spec", str(spec), "--to", "2", "--out", str(tmp_path / "out"), "--metrics", f"{url}/metrics"]) == 0
    shrunk = load_composition(tmp_path / "out" / "spec.yaml")
    leaders = {list(adapters)[i] for i in torch.argsort(engine.expert_load.sum(0), descending=True, stable=True)[:2].tolist()}
    assert [len(leaders & set(e.name.split("-"))) for e in shrunk.experts] == [1, 1]  # the two most used lead a group each
