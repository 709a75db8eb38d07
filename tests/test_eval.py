"""The evaluation harness computes the right numbers: loss and accuracy against hand-computed values."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergeserve.cli import main
from mergeserve.engine.model import Batch, Capture, Transformer
from mergeserve.eval.datasets import EvalData, load_eval_data
from mergeserve.eval.harness import evaluate_engine, evaluate_specs, oracle_row
from mergeserve.eval.metrics import LossSum, cut_at_answer_line, extract_answer, matches, normalise_number
from mergeserve.eval.report import write_all
from mergeserve.eval.results import EvalResults
from mergeserve.eval.scoring import EvalSettings, engine_config
from mergeserve.kernels import top_k_experts
from mergeserve.router.request import KeywordRouter
from mergeserve.spec import parse_composition
from mergeserve.zoo.splits import write_jsonl
from tiny import composition, engine_for, make_checkpoint, perturbed_copy

DOMAINS = ("math", "german", "code")
MAX_TOKENS = 12  # short enough that most examples below are cut
ROUTE_TOKENS = 5  # each text's context, never scored: "Hallo" (5 tokens) scores nothing
TEXTS = {
    "math": ["Tom has 5 apples and buys 3 more, so he has 8.", "What is 12 + 7? 12 + 7 = 19. Then 19 + 1 = 20."],
    "german": ["Der Hund läuft schnell über die Straße.", "Die Katze schläft im Haus.", "Hallo"],
    "code": ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"],
}
OTHER = {  # the second held-out set: other texts, other phrasings
    "math": ["Mia owns 6 pens; her friend gives her 2, which makes 8 pens."],
    "german": ["Im Garten wachsen viele bunte Blumen."],
    "code": ["for item in items:\n    total += item\n"],
}
PROBLEMS = [  # what the taught model memorises: question, worked steps, answer
    ("Anna has 3 cats and 4 dogs. How many pets?", "3 + 4 = 7", "7"),
    ("Ben reads 12 pages a day for 5 days. How many pages?", "12 * 5 = 60", "60"),
    ("Carla has 1,500 dollars and spends 250. How much is left?", "1500 - 250 = 1250", "1250"),
    ("Dora packs 9 boxes of 11 cups. How many cups?", "9 * 11 = 99", "99"),
]


def settings(**kw) -> EvalSettings:
    return EvalSettings(**{"max_tokens": MAX_TOKENS, "mixed_per_domain": 2, "math_examples": 0,
                           "max_new_tokens": 24, "max_num_seqs": 4, "chunk": 2, "route_tokens": ROUTE_TOKENS, **kw})


def spec(base: Path, experts: dict[str, Path], **extra):
    return parse_composition(composition("-".join(experts), base, experts, **extra))


ENGINE = engine_config(settings())  # the engine evaluate_specs builds for these settings


def reference_nll(
    folder: Path | list[Path], texts: list[str], max_tokens: int = MAX_TOKENS, context: int = ROUTE_TOKENS,
) -> LossSum:
    """Summed NLL, token and example counts by hand: transformers' logits, log_softmax, token by
    token from position `context` on; several folders: the NLL of their equal-weight mixture,
    log mean_i p_i(token)."""
    folders = folder if isinstance(folder, list) else [folder]
    models = [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in folders]
    tokenizer = AutoTokenizer.from_pretrained(folders[0])
    total = LossSum()
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
        if len(ids) <= context:
            continue
        with torch.no_grad():
            each = torch.stack([torch.log_softmax(m(torch.tensor([ids])).logits[0].double(), dim=-1) for m in models])
        logprobs = torch.logsumexp(each, dim=0) - math.log(len(models))  # [T, V]
        total += LossSum(-sum(float(logprobs[t - 1, ids[t]]) for t in range(context, len(ids))), len(ids) - context, 1)
    return total


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("heldout")
    write_jsonl(root / "german" / "heldout.jsonl", [{"text": t} for t in TEXTS["german"]])
    write_jsonl(root / "code" / "heldout.jsonl", [{"text": t} for t in TEXTS["code"]])
    write_jsonl(root / "math" / "heldout.jsonl", [
        {"question": q, "answer": a, "text": f"Question: {q}\n{s}\nAnswer: {a}"} for q, s, a in PROBLEMS
    ] + [{"question": "x", "answer": "0", "text": t} for t in TEXTS["math"]])
    for domain, texts in OTHER.items():
        write_jsonl(root / domain / "other.jsonl", [{"question": "How many pens?", "answer": "8", "text": t} for t in texts])
    return root


def loss_data(domains=DOMAINS) -> EvalData:
    return EvalData({d: [{"text": t} for t in TEXTS[d]] for d in domains}, [], [])


# --- answer extraction ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("3 + 4 = 7\nAnswer: 7", "7"),
    ("Answer: 1,250", "1250"),
    ("Answer: $1,250.00 dollars", "1250"),
    ("Answer: 12.0", "12"),
    ("Answer: -0042", "-42"),
    ("Answer: 2.50.", "2.5"),
    ("Answer: 3\nQuestion: next\nAnswer: 9", "9"),  # the last Answer: of the text
    ("Answer:7", "7"),
    ("The answer is 7", None),
    ("Answer: seven", None),
    ("Answer: ", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_generation_is_cut_after_its_first_answer_line():
    text = "5 * 3 = 15\nAnswer: 15\nQuestion: more?\nAnswer: 99"
    assert cut_at_answer_line(text) == "5 * 3 = 15\nAnswer: 15"
    got = extract_answer(cut_at_answer_line(text))
    assert matches(got, "15") and matches(got, "15.00") and not matches(got, "99") and not matches(None, "15")
    assert cut_at_answer_line("no answer here") == "no answer here"
    assert normalise_number("1,000") == "1000" and normalise_number("0.50") == "0.5" and normalise_number("abc") is None


# --- loss ----------------------------------------------------------------------------------

def test_uniform_model_loss_is_log_vocab(tmp_path):
    """A zero output head gives every token probability 1/V: the loss must be exactly ln V."""
    folder = make_checkpoint(tmp_path / "uniform")
    weights = load_file(str(folder / "model.safetensors"))
    weights["lm_head.weight"].zero_()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    engine = engine_for(spec(folder, {"only": folder}), ENGINE)
    result = evaluate_engine(engine, loss_data(("german",)), settings())
    vocab = engine.composed.config.vocab_size
    assert result.domains["german"].loss == pytest.approx(math.log(vocab), abs=1e-5)
    ids = [engine.tokenizer(t, add_special_tokens=False).input_ids[:MAX_TOKENS] for t in TEXTS["german"]]
    assert result.domains["german"].tokens == sum(max(0, len(x) - ROUTE_TOKENS) for x in ids) > 0
    assert result.domains["german"].examples == 2  # "Hallo" is all context


def test_loss_matches_a_hand_computed_value(zoo):
    engine = engine_for(spec(zoo["base"], {"math": zoo["math"]}), ENGINE)
    result = evaluate_engine(engine, loss_data(), settings())
    for domain in DOMAINS:
        expected = reference_nll(zoo["math"], TEXTS[domain])
        got = result.domains[domain]
        assert (got.tokens, got.examples) == (expected.tokens, expected.examples)
        assert got.nll == pytest.approx(expected.nll, rel=1e-5)
        assert got.loss == pytest.approx(expected.nll / expected.tokens, rel=1e-5)  # token-weighted, not per example


def test_mixed_set_and_oracle_from_single_experts(zoo, data_dir):
    data = load_eval_data(data_dir, DOMAINS, mixed_per_domain=2, math_examples=0)
    assert sorted(d for d, _ in data.mixed) == sorted(DOMAINS * 2)
    assert [d for d, _ in data.mixed] != sorted(d for d, _ in data.mixed)  # interleaved, not grouped
    assert load_eval_data(data_dir, DOMAINS, mixed_per_domain=2).mixed == data.mixed  # seeded
    specs = [(d, spec(zoo["base"], {d: zoo[d]})) for d in DOMAINS]
    rows = evaluate_specs(specs, data, settings())
    oracle = oracle_row(rows, DOMAINS)
    total = LossSum()
    for domain in DOMAINS:
        expected = reference_nll(zoo[domain], [e["text"] for d, e in data.mixed if d == domain])
        total += expected
        assert oracle.mixed.by_domain[domain].nll == pytest.approx(expected.nll, rel=1e-5)
        assert oracle.mixed.by_domain[domain].tokens == expected.tokens
        assert oracle.domains[domain] == rows[DOMAINS.index(domain)].domains[domain]
    assert oracle.mixed.total.loss == pytest.approx(total.loss, rel=1e-5)
    with pytest.raises(ValueError, match="german"):
        oracle_row([r for r in rows if r.expert != "german"], DOMAINS)


def test_a_route_row_scores_each_example_with_the_member_its_router_picks(zoo, data_dir):
    """Keywords send each domain's examples to that domain's model: the row then equals the oracle."""
    keywords = {"math": ["has", "what"], "german": ["der", "die", "hallo"], "code": ["def", "import"]}
    route = parse_composition({"name": "route", "method": "route", "router": {"kind": "keywords"},
                               "experts": [{"name": d, "source": str(zoo[d]), "keywords": keywords[d]} for d in DOMAINS]})
    data = load_eval_data(data_dir, DOMAINS, mixed_per_domain=2, math_examples=0)
    rows = evaluate_specs([(d, spec(zoo["base"], {d: zoo[d]})) for d in DOMAINS] + [("route", route)], data, settings())
    oracle, routed = oracle_row(rows, DOMAINS), rows[-1]
    assert routed.kind == "route"
    scored = {d: rows[DOMAINS.index(d)].domains[d].examples for d in DOMAINS}  # "Hallo" is neither routed nor scored
    assert scored["german"] == len(data.domains["german"]) - 1
    assert routed.routing == {d: {m: scored[d] if m == d else 0 for m in DOMAINS} for d in DOMAINS} | {
        "math problems": dict.fromkeys(DOMAINS, 0)}
    for domain in DOMAINS:
        assert routed.domains[domain].nll == pytest.approx(oracle.domains[domain].nll, rel=1e-6)
    assert routed.mixed.total.nll == pytest.approx(oracle.mixed.total.nll, rel=1e-6)


def test_a_top_k_route_row_scores_each_example_under_its_members_mixture(zoo, data_dir):
    """No keyword occurs anywhere: every example goes to both members, mixed at equal weight."""
    route = parse_composition({"name": "route", "method": "route", "router": {"kind": "keywords", "top_k": 2},
                               "experts": [{"name": d, "source": str(zoo[d]), "keywords": ["zzzz"]} for d in ("math", "german")]})
    data = load_eval_data(data_dir, DOMAINS, mixed_per_domain=2, math_examples=2)
    row = evaluate_specs([("route", route)], data, settings())[0]
    for domain in DOMAINS:
        expected = reference_nll([zoo["math"], zoo["german"]], [e["text"] for e in data.domains[domain]])
        assert (row.domains[domain].nll, row.domains[domain].tokens) == (pytest.approx(expected.nll, rel=1e-5), expected.tokens)
    assert {s.member for s in row.math.samples} <= {"math+german", "german+math"} and row.math.n == 2


def test_a_sequence_routed_row_scores_only_the_tokens_after_those_it_routes_on(zoo, tmp_path, monkeypatch):
    """A perplexity-routed MoE chooses each text's expert from its first ROUTE_TOKENS tokens and
    scores the tokens after them, the same positions as a plain row, each under the expert chosen."""
    experts = {d: perturbed_copy(zoo["base"], tmp_path / d, seed=i + 1, only="model.layers.") for i, d in enumerate(DOMAINS)}
    engine = engine_for(spec(zoo["base"], experts, router={"kind": "perplexity", "top_k": 1}), ENGINE)
    chosen, route = {}, engine.mixture_router.weights

    def spy(prompts, bias=None):
        alpha = route(prompts, bias)  # [N, E], one-hot
        chosen.update(zip(map(tuple, prompts), alpha.argmax(1).tolist()))
        return alpha

    monkeypatch.setattr(engine.mixture_router, "weights", spy)
    routed = evaluate_engine(engine, loss_data(), settings())
    plain = evaluate_engine(engine_for(spec(zoo["base"], {"math": experts["math"]}), ENGINE), loss_data(), settings())
    assert {len(p) for p in chosen} == {ROUTE_TOKENS}
    for domain in DOMAINS:
        ids = {t: engine.tokenizer(t, add_special_tokens=False).input_ids[:MAX_TOKENS] for t in TEXTS[domain]}
        long = {t: x for t, x in ids.items() if len(x) > ROUTE_TOKENS}
        # Each text by hand under the expert its context chose (separate attention: that expert's own model).
        expected = sum((reference_nll(experts[DOMAINS[chosen[tuple(x[:ROUTE_TOKENS])]]], [t]) for t, x in long.items()), LossSum())
        got = routed.domains[domain]
        assert got.tokens == plain.domains[domain].tokens == sum(len(x) - ROUTE_TOKENS for x in long.values()) == expected.tokens
        assert got.examples == plain.domains[domain].examples == len(long)
        assert got.nll == pytest.approx(expected.nll, rel=1e-5)
    assert len(set(chosen.values())) > 1  # the texts did go to different experts


def test_a_route_row_scores_the_tokens_after_the_prefix_it_routes_on(zoo, tmp_path, monkeypatch):
    """Members of two tokenizers: the request router reads the text of the first member's first
    ROUTE_TOKENS tokens; that member scores its tokens after them, the other member its tokens
    that start at or after that text's end."""
    other = make_checkpoint(tmp_path / "other", "llama", seed=5, tokenizer_vocab=300)  # fewer merges: other tokens
    route = parse_composition({"name": "route", "method": "route", "router": {"kind": "keywords"}, "experts": [
        {"name": "math", "source": str(zoo["math"]), "keywords": ["has", "what", "def", "import"]},
        {"name": "other", "source": str(other), "keywords": ["der", "die"]},
    ]})
    seen, scores = [], KeywordRouter.scores
    monkeypatch.setattr(KeywordRouter, "scores", lambda self, texts: seen.extend(texts) or scores(self, texts))
    max_tokens = 40  # the other tokenizer needs ~3x the tokens for the same text
    row = evaluate_specs([("route", route)], loss_data(), settings(max_tokens=max_tokens))[0]
    reference, theirs = AutoTokenizer.from_pretrained(zoo["math"]), AutoTokenizer.from_pretrained(other)
    prefixes = []
    for domain in DOMAINS:
        expected = LossSum()
        for text in TEXTS[domain]:
            ours = reference(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(ours.input_ids) <= ROUTE_TOKENS:
                continue
            end = ours.offset_mapping[ROUTE_TOKENS - 1][1]
            prefixes.append(text[:end])
            if domain != "german":
                expected += reference_nll(zoo["math"], [text], max_tokens)
            else:
                offsets = theirs(text, add_special_tokens=False, return_offsets_mapping=True).offset_mapping
                context = sum(start < end for start, _ in offsets)
                assert context > ROUTE_TOKENS  # the same text is more of the other tokenizer's tokens
                expected += reference_nll(other, [text], max_tokens, context)
        got = row.domains[domain]
        assert (got.tokens, got.examples) == (expected.tokens, expected.examples) and got.tokens > 0
        assert got.nll == pytest.approx(expected.nll, rel=1e-5)
    assert seen == prefixes and prefixes[0] == "Tom has 5 apples"
    assert row.routing["german"] == {"math": 0, "other": 2} and row.routing["math"] == {"math": 2, "other": 0}


def test_router_load_is_reported_per_domain(zoo):
    """Each domain's reported shares are the top-2 picks counted by hand from the router's inputs."""
    moe = spec(zoo["base"], {d: zoo[d] for d in DOMAINS}, router={"kind": "random", "top_k": 2})
    engine = engine_for(moe, ENGINE)
    data = loss_data()
    result = evaluate_engine(engine, data, settings())
    assert set(result.router) == set(DOMAINS)
    for domain, examples in data.domains.items():
        picks = torch.zeros(len(engine.composed.layers), 3)  # [L, E]
        for example in examples:
            ids = engine.tokenizer(example["text"], add_special_tokens=False).input_ids[:MAX_TOKENS]
            if len(ids) <= ROUTE_TOKENS:  # scores nothing, so never runs
                continue
            captured = Capture(ffn=[])
            Transformer(engine.composed, max_len=MAX_TOKENS)(Batch.right_padded([ids]), capture=captured)
            for n, x in enumerate(captured.ffn):
                _, chosen = top_k_experts(x, engine.composed.layers[n].router, 2)
                picks[n] += torch.bincount(chosen.flatten(), minlength=3)
        share = picks / picks.sum(1, keepdim=True)
        torch.testing.assert_close(torch.tensor(result.router[domain].per_layer, dtype=torch.float64), share.double(), atol=1e-6, rtol=0)


# --- math accuracy -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Path:
    """A tiny model trained until it answers PROBLEMS from memory (greedy)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("taught") / "model")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = [tokenizer(f"Question: {q}\n{s}\nAnswer: {a}", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            for q, s, a in PROBLEMS]
    width = max(map(len, rows))
    x = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):  # about 0.02 nats per token from here on: the text after "Question: " is learnt
        loss = model(input_ids=x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_math_accuracy_counts_exact_matches(taught, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(taught, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(taught)
    extracted = []
    for question, _, _ in PROBLEMS:
        ids = tokenizer(f"Question: {question}\n", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids):]
        extracted.append(extract_answer(cut_at_answer_line(tokenizer.decode(out, skip_special_tokens=True))))
    assert None not in extracted, extracted  # the model did learn to answer
    # Gold answers: the first two are what greedy produces (one written with a thousands
    # separator and a trailing .0), the other two are off by a digit: exactly 2 of 4 match.
    gold = [f"{int(extracted[0]):,}.0", extracted[1], extracted[2] + "1", "9" + extracted[3]]
    problems = [{"question": q, "answer": g, "text": ""} for (q, _, _), g in zip(PROBLEMS, gold)]
    engine = engine_for(spec(taught, {"only": taught}), ENGINE)
    result = evaluate_engine(engine, EvalData({}, problems, []), settings())
    assert result.math.correct == 2 and result.math.n == 4
    assert result.math.accuracy == 0.5
    assert [s.extracted for s in result.math.samples] == extracted
    assert [s.correct for s in result.math.samples] == [True, True, False, False]


# --- the command ---------------------------------------------------------------------------

def test_results_of_earlier_runs_are_written_back_unchanged(tmp_path):
    """--reuse and the README read results.json files of earlier runs: read into typed rows and
    written out again, every committed one comes back byte for byte."""
    files = sorted((Path(__file__).resolve().parent.parent / "benchmarks" / "results").glob("**/results.json"))
    assert any(f.parent.name == "other" for f in files)  # the second held-out set's too
    for i, path in enumerate(files):
        write_all(tmp_path / str(i), EvalResults.from_json(json.loads(path.read_text())))
        assert (tmp_path / str(i) / "results.json").read_text() == path.read_text(), path


def test_eval_command_writes_results(zoo, data_dir, tmp_path, capsys):
    specs = []
    for name, experts, extra in [
        ("base", {"base": zoo["base"]}, {}),
        *[(d, {d: zoo[d]}, {}) for d in DOMAINS],
        ("linear", {d: zoo[d] for d in DOMAINS}, {"method": "linear"}),
        ("moe", {d: zoo[d] for d in DOMAINS}, {"router": {"kind": "random", "top_k": 2}}),
    ]:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "base": str(zoo["base"]), **extra,
                                        "experts": [{"name": n, "source": str(p)} for n, p in experts.items()]}))
        specs += ["--spec", str(path)]
    out = tmp_path / "out"
    argv = ["eval", *specs, "--oracle", "--out", str(out), "--data", str(data_dir),
            "--max-tokens", "12", "--route-tokens", "5", "--mixed", "2", "--math", "2", "--max-new-tokens", "8"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["rows"]] == ["base", *DOMAINS, "linear", "moe"]
    assert [r["kind"] for r in results["rows"]] == ["base", "expert", "expert", "expert", "linear", "btx"]
    assert results["oracle"]["domains"]["code"] == results["rows"][3]["domains"]["code"]
    assert results["settings"]["loss_examples"] == {"math": 6, "german": 3, "code": 2}
    hallo = sum(e["text"] == "Hallo" for _, e in load_eval_data(data_dir, DOMAINS, mixed_per_domain=2).mixed)
    assert results["settings"]["unscored"] == {"math": 0, "german": 1, "code": 0, "mixed": hallo}  # every row alike
    assert "examples of at most 5 tokens score nothing: german 1" in (out / "results.md").read_text().lower()
    assert "router" in results["rows"][5] and "router" not in results["rows"][4]
    table = (out / "results.md").read_text()
    assert "| oracle |" in table and "mixed loss" in table and "Experts against the base" in table
    # The oracle keeps every expert's whole gain; n/a where a (random) expert is no better than the base.
    gains = {d: results["rows"][0]["domains"][d]["loss"] > results["oracle"]["domains"][d]["loss"] for d in DOMAINS}
    assert f"| oracle | {' | '.join('100.0%' if gains[d] else 'n/a' for d in DOMAINS)} |" in table
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --reuse keeps the rows whose spec and source files are unchanged; a touched source is re-run.
    weights = next(zoo["math"].glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert main([*argv, "--reuse"]) == 0
    again = json.loads((out / "results.json").read_text())["rows"]
    kept = [new["timings"] == old["timings"] for new, old in zip(again, results["rows"])]
    assert kept == [True, False, True, True, False, False]  # math, linear and moe read the math expert

    # --oracle without an expert per domain is a usage error, found before anything is built.
    assert main(["eval", "--spec", specs[1], "--oracle", "--out", str(tmp_path / "x"), "--data", str(data_dir)]) == 2
    assert "none for" in capsys.readouterr().err

    # --domains scores a subset: the oracle then needs an expert for those domains only.
    two = [*specs[:4], *specs[6:8], *specs[10:]]  # base, math, code, moe
    assert main(["eval", *two, "--oracle", "--domains", "math", "code", "--out", str(tmp_path / "two"), "--data", str(data_dir),
                 "--max-tokens", "12", "--route-tokens", "5", "--mixed", "2", "--math", "2", "--max-new-tokens", "8"]) == 0
    subset = json.loads((tmp_path / "two" / "results.json").read_text())
    assert subset["domains"] == ["math", "code"] and set(subset["oracle"]["domains"]) == {"math", "code"}

    # --sets scores each held-out set into its own folder, and puts them side by side in OUT/results.md.
    assert main(["eval", *two, "--oracle", "--domains", "math", "code", "--sets", "heldout", "other", "--out", str(tmp_path / "sets"),
                 "--data", str(data_dir), "--max-tokens", "12", "--route-tokens", "5", "--mixed", "1", "--math", "1",
                 "--max-new-tokens", "8"]) == 0
    other = json.loads((tmp_path / "sets" / "other" / "results.json").read_text())
    assert other["settings"]["held_out"] == "other" and other["settings"]["loss_examples"] == {"math": 1, "code": 1}
    assert other["rows"][0]["domains"]["code"]["loss"] != subset["rows"][0]["domains"]["code"]["loss"]
    both = (tmp_path / "sets" / "results.md").read_text()
    other_gains = {d: other["rows"][0]["domains"][d]["loss"] > other["oracle"]["domains"][d]["loss"] for d in ("math", "code")}
    cells = [f"{'100%' if gains[d] else 'n/a'} / {'100%' if other_gains[d] else 'n/a'}" for d in ("math", "code")]
    assert f"| oracle | {' | '.join(cells)} |" in both and "# Set `other`" in both
