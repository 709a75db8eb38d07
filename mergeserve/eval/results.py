"""The results of `mergeserve eval`, typed: what scoring computes, the harness and route rows
carry, and the report reads.

`to_json` gives the layout of results.json (NaN stays NaN; the report writes it as null) and
`from_json` reads a results.json back, of this version or an earlier one: `--reuse` keeps its
rows, and the README's figures are rendered from the committed ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from mergeserve.eval.metrics import LossSum


def _nan(value: float | None) -> float:
    """A float read from results.json: null is a NaN that was written out."""
    return float("nan") if value is None else value


@dataclass(frozen=True)
class MathSample:
    """One math problem's greedy answer."""

    answer: str  # the gold answer
    extracted: str | None  # the number after the output's `Answer:`, normalised; None: no such line
    correct: bool
    output: str  # the generation, cut after its first `Answer:` line
    member: str | None = None  # route rows: the members that answered, the lead first, joined by "+"

    def to_json(self) -> dict:
        out = {"answer": self.answer, "extracted": self.extracted, "correct": self.correct, "output": self.output}
        return out if self.member is None else out | {"member": self.member}

    @classmethod
    def from_json(cls, d: dict) -> MathSample:
        return cls(d["answer"], d["extracted"], d["correct"], d["output"], d.get("member"))


@dataclass(frozen=True)
class MathScore:
    """Exact-match accuracy on the math problems. The optional fields are left out of the JSON
    where they are None: the oracle row generates nothing, and a row without problems records no
    format share."""

    accuracy: float  # NaN without problems
    correct: int
    n: int
    formatted: float | None = None  # the share of outputs that end in an `Answer: N` line at all
    generated_tokens: int | None = None
    samples: list[MathSample] | None = None

    def to_json(self) -> dict:
        out: dict = {"accuracy": self.accuracy, "correct": self.correct, "n": self.n}
        if self.formatted is not None:
            out["formatted"] = self.formatted
        if self.generated_tokens is not None:
            out["generated_tokens"] = self.generated_tokens
        if self.samples is not None:
            out["samples"] = [s.to_json() for s in self.samples]
        return out

    @classmethod
    def from_json(cls, d: dict) -> MathScore:
        return cls(
            _nan(d["accuracy"]), d["correct"], d["n"],
            _nan(d["formatted"]) if "formatted" in d else None, d.get("generated_tokens"),
            [MathSample.from_json(s) for s in d["samples"]] if "samples" in d else None,
        )


@dataclass(frozen=True)
class MixedLoss:
    """The mixed set's loss in total and per source domain."""

    total: LossSum
    by_domain: dict[str, LossSum]

    def to_json(self) -> dict:
        return {**self.total.as_dict(), "by_domain": {d: s.as_dict() for d, s in self.by_domain.items()}}

    @classmethod
    def from_json(cls, d: dict) -> MixedLoss:
        return cls(LossSum.from_dict(d), {k: LossSum.from_dict(v) for k, v in d["by_domain"].items()})


@dataclass(frozen=True)
class RouterLoad:
    """An MoE's routing while one domain's loss set was scored: per expert, its share of each
    layer's picks and the mean routing weight of its picks, averaged over layers and per layer."""

    experts: dict[str, float]
    per_layer: list[list[float]]  # [L][E]
    mean_weight: dict[str, float]
    mean_weight_per_layer: list[list[float]]  # [L][E]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RouterLoad:
        return cls(d["experts"], d["per_layer"], d["mean_weight"], d["mean_weight_per_layer"])


@dataclass(frozen=True, kw_only=True)
class ModelScores:
    """Every metric of one model (a composition, or a route composition's members together)."""

    domains: dict[str, LossSum]  # the held-out loss per domain
    mixed: MixedLoss
    math: MathScore
    timings: dict[str, float] | None = None  # seconds per step; None in the oracle row, which runs nothing
    router: dict[str, RouterLoad] | None = None  # MoE rows: per domain
    routing: dict[str, dict[str, int]] | None = None  # route rows: per domain (and math problems), the examples each member led


@dataclass(frozen=True, kw_only=True)
class RowKind:
    """What a row is: the base alone, one expert alone, a composition of several (`kind` is its
    method), or the oracle."""

    kind: str
    expert: str | None = None  # kind "expert": its name, the domain it is the expert of
    experts: list[str] | None = None  # a composition: its experts' names


@dataclass(frozen=True, kw_only=True)
class Row(ModelScores, RowKind):
    """One line of the results: a model's scores, what it is and where it came from."""

    name: str
    spec: str | None  # the spec file as given on the command line; None for the oracle
    fingerprint: str | None = None  # what lets --reuse keep the row (harness.fingerprint)
    sources: dict[str, str] | None = None  # the oracle: per domain, the row whose expert scored it

    @classmethod
    def of(cls, scores: ModelScores, what: RowKind, **identity) -> Row:
        return cls(**{f.name: getattr(scores, f.name) for f in fields(ModelScores)},
                   **{f.name: getattr(what, f.name) for f in fields(RowKind)}, **identity)

    def to_json(self) -> dict:
        """In the order results.json has always had; fields that are None are left out (but `spec`)."""
        out: dict = {"name": self.name, "spec": self.spec}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        out["kind"] = self.kind
        if self.expert is not None:
            out["expert"] = self.expert
        if self.experts is not None:
            out["experts"] = self.experts
        out["domains"] = {d: s.as_dict() for d, s in self.domains.items()}
        if self.timings is not None:
            out["timings"] = self.timings
        if self.routing is not None:
            out["routing"] = self.routing
        out["mixed"] = self.mixed.to_json()
        out["math"] = self.math.to_json()
        if self.router is not None:
            out["router"] = {d: r.to_json() for d, r in self.router.items()}
        if self.sources is not None:
            out["sources"] = self.sources
        return out

    @classmethod
    def from_json(cls, d: dict) -> Row:
        return cls(
            name=d["name"], spec=d["spec"], fingerprint=d.get("fingerprint"),
            kind=d["kind"], expert=d.get("expert"), experts=d.get("experts"),
            domains={k: LossSum.from_dict(v) for k, v in d["domains"].items()},
            mixed=MixedLoss.from_json(d["mixed"]), math=MathScore.from_json(d["math"]), timings=d.get("timings"),
            router={k: RouterLoad.from_json(v) for k, v in d["router"].items()} if "router" in d else None,
            routing=d.get("routing"), sources=d.get("sources"),
        )


@dataclass(frozen=True)
class EvalResults:
    """A whole `mergeserve eval` run: results.json."""

    domains: list[str]
    # What was measured and how, as recorded: the settings, the scoring rule and the data. Kept as
    # the record it is, since files of earlier versions lack later keys (report.scoring reads both).
    settings: dict
    rows: list[Row]
    oracle: Row | None
    wall_s: float

    @property
    def all_rows(self) -> list[Row]:
        """The rows, then the oracle's if there is one."""
        return self.rows + ([self.oracle] if self.oracle else [])

    def to_json(self) -> dict:
        return {"domains": self.domains, "settings": self.settings, "rows": [r.to_json() for r in self.rows],
                "oracle": self.oracle.to_json() if self.oracle else None, "wall_s": self.wall_s}

    @classmethod
    def from_json(cls, d: dict) -> EvalResults:
        return cls(d["domains"], d["settings"], [Row.from_json(r) for r in d["rows"]],
                   Row.from_json(d["oracle"]) if d.get("oracle") else None, d["wall_s"])
