"""A sequence router's inverse temperature and per-expert offsets, fitted on prompts labelled with their expert.

Temperature scaling (Guo et al., 2017) and its vector form: the inverse temperature t and offsets
o that maximise the likelihood of each prompt's own expert under softmax(t * (scores + o)), the
router's scores held fixed. The loss is convex in (t, t * o): a golden-section search over log t
starts it, L-BFGS fits both. The offsets are the prior the raw scores lack (one expert's
perplexity is lower on every short question). `mergeserve calibrate-router` fits them on a split
the user holds out (the zoo's: examples/zoo/data/<expert>/short_chat_dev.jsonl) and writes the spec
with `router.inverse_temperature` and `router.offsets`, so no one sets them by hand.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import yaml

from mergeserve.calibration import data_files, read_texts
from mergeserve.engine.mixture_router import MixtureRouter
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build
from mergeserve.router.content import content_tokens
from mergeserve.spec import load_composition

SEARCH = (1e-2, 1e5)  # the inverse temperatures searched


def fit_inverse_temperature(scores: torch.Tensor, truth: torch.Tensor, steps: int = 60) -> float:
    """The t minimising mean -log softmax(t * scores)[truth] over prompts: scores [N, E], truth [N]."""
    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(math.exp(log_t) * scores.double(), truth))

    lo, hi = (math.log(x) for x in SEARCH)
    golden = (math.sqrt(5) - 1) / 2
    a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
    fa, fb = loss(a), loss(b)
    for _ in range(steps):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - golden * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + golden * (hi - lo)
            fb = loss(b)
    return math.exp((lo + hi) / 2)


def fit_calibration(scores: torch.Tensor, truth: torch.Tensor, l2: float = 1e-4) -> tuple[float, torch.Tensor]:
    """(t, offsets [E]) minimising mean -log softmax(t * (scores + offsets))[truth]; the first
    expert's offset is 0 (a softmax is blind to a common shift). scores [N, E], truth [N]."""
    scores = scores.double()
    t = torch.tensor(fit_inverse_temperature(scores, truth), dtype=torch.float64, requires_grad=True)
    c = torch.zeros(scores.shape[1] - 1, dtype=torch.float64, requires_grad=True)  # t * offsets of experts 1..E-1
    opt = torch.optim.LBFGS([t, c], max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        logits = t * scores + torch.cat([c.new_zeros(1), c])
        value = torch.nn.functional.cross_entropy(logits, truth) + l2 * c.square().sum()
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)
    t_fit = float(t.detach())
    if t_fit <= 0:  # the labels run against the scores: the temperature alone, no offsets
        return fit_inverse_temperature(scores, truth), torch.zeros(scores.shape[1])
    return t_fit, torch.cat([c.detach().new_zeros(1), c.detach()]).float() / t_fit


def labelled_prompts(composed, data: dict[str, list[Path]], chat: bool) -> list[tuple[int, list[int], tuple[int, int] | None]]:
    """(expert index, prompt tokens, the span a router scores) of every text in `data` (expert -> files).
    chat: each text is a user message, templated as the server templates a chat."""
    names = list(composed.expert_names)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"no expert named {unknown} in this composition (its experts: {names})")
    rows = []
    for name, paths in data.items():
        for text in (t for f in data_files(paths) for t in read_texts(f)):
            if chat:
                templated = composed.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                                   add_generation_prompt=True)
                ids, span = content_tokens(composed.tokenizer, templated, text)
            else:
                ids, span = composed.tokenizer.encode(text), None
            rows.append((names.index(name), ids, span))
    return rows


def calibrate(spec_path: Path, data: dict[str, list[Path]], out: Path, chat: bool = True) -> tuple[float, dict[str, float], Path]:
    """Fit `spec_path`'s mixture router's inverse temperature and offsets on `data`; write the spec with them to `out`."""
    spec = load_composition(spec_path)
    if not spec.mixture_routed:
        raise ValueError(f"{spec_path}: router.kind={spec.router.kind} is not a sequence router (perplexity, task_vector)")
    composed = build(spec, ExpertPool())
    rows = labelled_prompts(composed, data, chat)
    router = MixtureRouter(composed)
    with torch.no_grad():  # not inference mode: a task-vector router differentiates the base model
        scores = torch.cat([router.scores([ids], [span]) for _, ids, span in rows])  # [N, E]
    t, offsets = fit_calibration(scores, torch.tensor([e for e, _, _ in rows]))
    named = {n: round(float(o), 6) for n, o in zip(composed.expert_names, offsets)}
    raw = yaml.safe_load(spec_path.read_text())
    raw["router"] = {**raw["router"], "inverse_temperature": round(t, 4), "offsets": named}
    out.write_text(f"# {spec_path.name} with router.inverse_temperature and router.offsets fitted by `mergeserve "
                   f"calibrate-router` on {len(rows)} labelled prompts\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return t, named, out
