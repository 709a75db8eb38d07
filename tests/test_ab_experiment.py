"""An A/B experiment end to end over two tiny compositions: traffic and feedback through the official
openai client, the alias's report, and rollouts that ramp up and roll back on their own."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai
import pytest

from live import Gateway, built, live_gateway, wait_until
from mergeserve.cli import main as cli
from mergeserve.engine.executor import Executor
from mergeserve.experts import ExpertPool
from mergeserve.server import Registry
from mergeserve.server.ab.replicas import fetch, replicas_report
from mergeserve.server.ab.rollout import MIN_GUARD_REQUESTS
from mergeserve.server.auth import Auth
from mergeserve.server.builder import Builder
from mergeserve.server.state import StateStore
from mergeserve.server.watch import apply
from mergeserve.spec import EngineConfig, ServeConfig, parse_composition


@dataclass(kw_only=True)
class Experiment(Gateway):
    def put_alias(self, alias: dict) -> dict:
        response = self.http.put("/admin/aliases/ab", json=alias, headers=self.admin)
        assert response.status_code == 200, response.text
        return response.json()

    def report(self) -> dict:
        return self.http.get("/admin/aliases/ab/report", headers=self.admin).json()

    def ask(self, user: str | None = None) -> tuple[str, str]:
        """One request to the alias: the response's id and the composition that answered."""
        raw = self.client.completions.with_raw_response.create(model="ab", prompt="hi", max_tokens=2, user=user,
                                                              extra_body={"ignore_eos": True})
        return raw.parse().id, raw.headers["x-mergeserve-composition"]

    def engine(self, name: str):
        return self.registry.revision(name)[0].backend.engine


def serving(builder: Builder, zoo: dict[str, Path]) -> Builder:
    """`builder` serving v1 (the zoo's code model) and v2 (its math model), each alone."""
    for name, source in (("v1", zoo["code"]), ("v2", zoo["math"])):
        spec = parse_composition({"name": name, "base": str(source), "experts": [{"name": name, "source": str(source)}]})
        assert built(builder, spec).state == "ready"
    return builder


def new_builder(zoo: dict[str, Path], state_dir: Path) -> Builder:
    config = EngineConfig(max_num_seqs=4, max_model_len=64, placement="own")
    return Builder(Registry(), ExpertPool(roots=[zoo["base"].parent]), Executor(), config, StateStore(state_dir))


@pytest.fixture()
def experiment(zoo: dict[str, Path], tmp_path: Path) -> Iterator[Experiment]:
    builder = serving(new_builder(zoo, tmp_path / "state"), zoo)
    with live_gateway(builder.registry, builder.executor, Auth(admin_key="admin-key"), builder, kind=Experiment) as e:
        yield e


def test_a_known_feedback_difference_reads_better_within_a_bounded_number_of_requests(experiment: Experiment) -> None:
    """Simulated users like v2's answers 80 % of the time and v1's 40 %: the report, read every 20
    requests, says v2 is `better` within 300 requests, and meanwhile never says anything else."""
    experiment.put_alias({"targets": {"v1": 1, "v2": 1}, "sticky": "none"})
    rng = np.random.default_rng(0)
    liked = {"v1": 0.4, "v2": 0.8}
    verdicts = []
    for i in range(1, 301):
        response_id, answered = experiment.ask()
        score = 1.0 if rng.random() < liked[answered] else -1.0
        assert experiment.http.post("/v1/feedback", json={"id": response_id, "score": score}).status_code == 200
        if i % 20 == 0:
            verdicts.append(experiment.report()["comparisons"]["v2"]["verdict"])
            if verdicts[-1] != "not yet":
                break
    assert verdicts[-1] == "better" and set(verdicts[:-1]) <= {"not yet"}, verdicts
    report = experiment.report()
    v1, v2 = report["targets"]["v1"], report["targets"]["v2"]
    assert v1["requests"] + v2["requests"] == 20 * len(verdicts)
    assert v1["errors"] == v2["errors"] == 0 and v1["error_rate"] == 0.0
    assert v2["feedback"]["count"] == v2["requests"] and v2["feedback"]["mean"] > v1["feedback"]["mean"]
    low, high = report["comparisons"]["v2"]["feedback"]["interval"]
    assert 0 < low < v2["feedback"]["mean"] - v1["feedback"]["mean"] < high
    assert v1["ttft_s"]["p50"] > 0 and v1["latency_s"]["p95"] >= v1["latency_s"]["p50"] > 0
    assert v1["output_tokens"] == 2 * v1["requests"]
    # What /metrics exports is enough to rebuild the report (several replicas: their sums).
    from_metrics = replicas_report(fetch([experiment.url]), "ab")
    assert from_metrics["targets"] == report["targets"] and from_metrics["comparisons"] == report["comparisons"]
    doubled = replicas_report(fetch([experiment.url, experiment.url]), "ab")  # as if two replicas saw the same
    assert doubled["targets"]["v1"]["requests"] == 2 * v1["requests"]


def test_changing_the_weights_starts_the_tally_afresh_and_redeclaring_them_does_not(experiment: Experiment) -> None:
    alias = {"targets": {"v1": 3, "v2": 1}}
    assert experiment.put_alias(alias)["generation"] == 1
    for user in ("a", "b", "c"):
        experiment.ask(user)
    assert experiment.put_alias(alias)["generation"] == 1  # the same declaration: nothing changes
    assert sum(t["requests"] for t in experiment.report()["targets"].values()) == 3
    assert experiment.put_alias({"targets": {"v1": 1, "v2": 1}})["generation"] == 2
    report = experiment.report()
    assert report["generation"] == 2 and sum(t["requests"] for t in report["targets"].values()) == 0


def test_the_cli_prints_the_report_of_the_replicas(experiment: Experiment, capsys: pytest.CaptureFixture) -> None:
    experiment.put_alias({"targets": {"v1": 1, "v2": 1}})
    for user in ("a", "b", "c", "d"):
        experiment.ask(user)
    assert cli(["ab", "report", "--url", experiment.url, "--alias", "ab"]) == 0
    out = capsys.readouterr().out
    assert "alias ab (control: v1" in out and "v2 vs v1: not yet" in out
    assert cli(["ab", "report", "--url", experiment.url, "--alias", "nope"]) == 1


def rollout(steps: list[float], min_requests: int = 4, interval_s: float = 0.5, **guards: object) -> dict:
    """An alias over v1 (control) and v2 (variant) ramping v2 through `steps`, evaluated every interval_s."""
    return {"targets": {"v1": 1, "v2": 1}, "sticky": "none", "rollout": {
        "steps": steps, "min_seconds": 0, "min_requests": min_requests, "interval_s": interval_s, "guards": guards}}


def test_a_rollout_ramps_the_variant_up_step_by_step_while_its_guards_hold(experiment: Experiment) -> None:
    started = experiment.put_alias(rollout([0.25, 0.5, 1.0], max_error_rate=0.2, max_ttft_p95_ratio=50))
    assert started["weights"] == {"v1": 0.75, "v2": 0.25} and started["rollout_status"] == "running"

    def status() -> str:
        experiment.ask()
        return experiment.report()["rollout"]["status"]

    wait_until(lambda: status() == "completed", timeout=60, what="the rollout to complete")
    report = experiment.report()
    assert report["weights"] == {"v1": 0.0, "v2": 1.0}
    assert [d["action"] for d in report["rollout"]["decisions"]] == ["start", "advance", "complete"]
    assert {experiment.ask()[1] for _ in range(5)} == {"v2"}
    decisions = {s.labels["action"]: s.value for s in experiment.scrape() if s.name == "mergeserve:rollout_decisions_total"}
    assert decisions == {"start": 1, "advance": 1, "complete": 1, "rollback": 0}  # every action from the start


def test_a_failing_variant_rolls_back_within_one_interval_and_stays_rolled_back_after_a_restart(
    experiment: Experiment, zoo: dict[str, Path], tmp_path: Path,
) -> None:
    """Injected: every engine step of v2 raises, so its requests fail (500). The error-rate guard
    fails at the next evaluation and the alias sends everything to v1 again."""
    experiment.put_alias(rollout([0.5, 1.0], min_requests=1000, interval_s=1.0, max_error_rate=0.05))  # only a guard ends it
    engine = experiment.engine("v2")

    def failing(*args, **kwargs):
        raise RuntimeError("injected fault")

    engine.model.forward = failing
    failures = []  # when each of v2's requests failed
    while experiment.report()["rollout"]["status"] == "running":
        assert len(failures) < 100, "no rollback"
        try:
            experiment.ask()
        except openai.InternalServerError:
            failures.append(time.time())
    report = experiment.report()
    rollback = report["rollout"]["decisions"][-1]
    assert rollback["action"] == "rollback" and "error_rate fail" in rollback["reason"]
    tipping = failures[MIN_GUARD_REQUESTS - 1]  # the guard judges from the 10th request on; all of them failed
    assert rollback["time"] - tipping <= 1.0 + 0.25  # one interval, and the controller's wake-up slack
    assert report["weights"] == {"v1": 1.0, "v2": 0.0}
    assert {experiment.ask()[1] for _ in range(5)} == {"v1"}
    experiment.builder.shutdown()

    # A restart from the same state: the rollback, its reason and the weights are still there.
    builder = new_builder(zoo, tmp_path / "state")
    builder.restore([])
    wait_until(lambda: set(builder.registry.names()) == {"v1", "v2"}, what="the restore")
    spec, state = builder.registry.alias("ab")
    assert state.rollout.status == "rolled_back" and state.weights == {"v1": 1.0, "v2": 0.0}
    assert state.rollout.decisions[-1] == type(state.rollout.decisions[-1]).model_validate(rollback)
    builder.shutdown()


def test_a_rollout_in_the_serve_config_starts_once_and_a_reload_of_the_same_config_leaves_it(
    zoo: dict[str, Path], tmp_path: Path,
) -> None:
    builder = serving(new_builder(zoo, tmp_path / "state"), zoo)
    config = ServeConfig(state_dir=str(tmp_path / "state"), aliases={"ab": rollout([0.1, 1.0])})
    apply(builder, ServeConfig(state_dir=str(tmp_path / "state")), config)
    _, first = builder.registry.alias("ab")
    assert first.rollout.status == "running" and first.weights == {"v1": pytest.approx(0.9), "v2": 0.1}
    apply(builder, config, config.model_copy(deep=True))  # the ConfigMap written again, unchanged
    assert builder.registry.alias("ab")[1] == first
    builder.shutdown()


def test_a_rollout_needs_two_targets_and_increasing_steps(experiment: Experiment) -> None:
    for bad in ({"targets": {"v1": 1}, "rollout": {}}, rollout([0.5, 0.2]), rollout([0.0, 1.0]),
                {"targets": {"v1": 0, "v2": 0}}):
        response = experiment.http.put("/admin/aliases/ab", json=bad, headers=experiment.admin)
        assert response.status_code in (400, 422), response.text
    assert experiment.http.get("/admin/aliases/ab/report", headers=experiment.admin).status_code == 404
