"""What `mergeserve eval` writes: results.json, results.md (tables) and loss.png (bar chart)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from mergeserve.eval.results import EvalResults
from mergeserve.zoo.card import TARGET_GAIN


def write_all(out_dir: str | Path, results: EvalResults) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "loss.png"]
    paths[0].write_text(json.dumps(_finite(results.to_json()), indent=1, allow_nan=False) + "\n")
    paths[1].write_text(markdown(results))
    bar_chart(results, paths[2])
    return paths


def write_sets(out_dir: str | Path, done: dict[str, EvalResults]) -> Path:
    """OUT/results.md: the sets side by side (gain kept, math accuracy), then each set's tables."""
    path = Path(out_dir) / "results.md"
    lines = ["# Both held-out sets", "", "Share of each domain expert's gain over the base that a row keeps, and "
             "math accuracy, on each set (" + " / ".join(f"`{name}`" for name in done) + "); n/a where the domain's "
             "expert is no better than the base on that set, so that there is no gain to keep.", ""] + sets_table(done)
    for name, results in done.items():
        lines += ["", f"# Set `{name}`", "", markdown(results)]
    path.write_text("\n".join(lines) + "\n")
    return path


def kept_gains(results: EvalResults) -> dict[str, dict[str, float]]:
    """Per row name and domain: (base - row) / (base - the domain's expert); empty without them."""
    rows, domains = results.all_rows, results.domains
    base = next((r for r in rows if r.kind == "base"), None)
    experts = {r.expert: r for r in rows if r.kind == "expert"}
    if base is None or any(d not in experts for d in domains):
        return {}
    gain = {d: base.domains[d].loss - experts[d].domains[d].loss for d in domains}
    # Where the domain's expert is no better than the base there is no gain to keep a share of (NaN).
    return {row.name: {d: (base.domains[d].loss - row.domains[d].loss) / gain[d] if gain[d] > 0 else math.nan for d in domains}
            for row in rows}


def _share(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}%}"


def sets_table(done: dict[str, EvalResults]) -> list[str]:
    first = next(iter(done.values()))
    domains, kept = first.domains, {name: kept_gains(r) for name, r in done.items()}
    accuracy = {name: {row.name: row.math.accuracy for row in r.all_rows} for name, r in done.items()}
    head = [f"{d} gain kept" for d in domains] + ["math acc"]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for row in first.all_rows:
        cells = [" / ".join(_share(kept[n][row.name][d], 0) if row.name in kept[n] else "–" for n in done) for d in domains]
        cells.append(" / ".join(_cell(accuracy[n].get(row.name), None, 0, percent=True) for n in done))
        lines.append(f"| {row.name} | " + " | ".join(cells) + " |")
    return lines


def _finite(value):
    """NaN (a metric with nothing to measure) as JSON null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _cell(value: float, oracle: float | None, digits: int, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    scale, unit, gap_unit = (100, "%", " pp") if percent else (1, "", "")
    text = f"{value * scale:.{digits}f}{unit}"
    if oracle is not None and not math.isnan(oracle):
        text += f" ({(value - oracle) * scale:+.{digits}f}{gap_unit})"
    return text


def main_table(results: EvalResults) -> list[str]:
    domains = results.domains
    oracle = results.oracle
    head = ["model", *[f"{d} loss" for d in domains], "math acc", "math format", "mixed loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results.all_rows:
        o = oracle if oracle and row is not oracle else None
        cells = [row.name]
        cells += [_cell(row.domains[d].loss, o.domains[d].loss if o else None, 3) for d in domains]
        cells.append(_cell(row.math.accuracy, o.math.accuracy if o else None, 1, percent=True))
        formatted = float("nan") if row.math.formatted is None else row.math.formatted
        cells.append(_cell(formatted, o.math.formatted if o else None, 1, percent=True))
        cells.append(_cell(row.mixed.total.loss, o.mixed.total.loss if o else None, 3))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def acceptance(results: EvalResults) -> list[str]:
    """The zoo's rule: each expert beats the base by at least TARGET_GAIN on its own domain, and not on every domain."""
    rows = results.rows
    base = next((r for r in rows if r.kind == "base"), None)
    experts = [r for r in rows if r.kind == "expert" and r.expert in results.domains]
    if base is None or not experts:
        return []
    domains = results.domains
    lines = [f"| expert | base loss (own domain) | expert loss | gain | relative | >= {TARGET_GAIN:.0%} "
             "| better on every other domain too | passes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in experts:
        d = r.expert
        b, e = base.domains[d].loss, r.domains[d].loss
        rel = (b - e) / b
        others = [x for x in domains if x != d]
        all_better = bool(others) and all(r.domains[x].loss < base.domains[x].loss for x in others)
        ok = rel >= TARGET_GAIN and not all_better
        lines.append(f"| {r.name} | {b:.3f} | {e:.3f} | {b - e:+.3f} | {rel:+.1%} | {'yes' if rel >= TARGET_GAIN else 'no'} "
                     f"| {'yes' if all_better else 'no'} | {'yes' if ok else 'no'} |")
    return lines


def gain_table(results: EvalResults) -> list[str]:
    """Per row and domain, the share of the domain expert's gain over the base the row keeps:
    (base - row) / (base - expert), and the mean loss over the domains."""
    domains, gains = results.domains, kept_gains(results)
    if not gains:
        return []
    lines = ["| model | " + " | ".join(f"{d} gain kept" for d in domains) + " | lowest | mean loss |",
             "|---|" + "---|" * (len(domains) + 2)]
    for row in results.all_rows:
        kept = [gains[row.name][d] for d in domains]
        mean = sum(row.domains[d].loss for d in domains) / len(domains)
        lowest = min((k for k in kept if not math.isnan(k)), default=math.nan)
        lines.append(f"| {row.name} | " + " | ".join(_share(k) for k in kept) + f" | {_share(lowest)} | {mean:.3f} |")
    return lines


def router_tables(results: EvalResults) -> list[str]:
    lines = []
    for row in results.rows:
        if row.router is None:
            continue
        names = list(next(iter(row.router.values())).experts)
        lines += ["", f"**{row.name}**", "", "| tokens of | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for domain, load in row.router.items():
            lines.append(f"| {domain} | " + " | ".join(f"{load.experts[n]:.1%} ({load.mean_weight[n]:.2f})" for n in names) + " |")
    return lines


def routing_tables(results: EvalResults) -> list[str]:
    """Route compositions: how many of each domain's examples each member model got."""
    lines = []
    for row in results.rows:
        if row.routing is None:
            continue
        names = list(next(iter(row.routing.values())))
        lines += ["", f"**{row.name}**", "", "| examples of | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for domain, counts in row.routing.items():
            total = max(1, sum(counts.values()))
            lines.append(f"| {domain} | " + " | ".join(f"{counts[n]} ({counts[n] / total:.0%})" for n in names) + " |")
    return lines


def scoring(s: dict) -> str:
    """Which tokens were scored, as the settings record it."""
    if "scored" not in s:  # results from before the rule: every token after the first
        return (f"Every token after the first scored; sequence routers chose from the first "
                f"{s.get('route_tokens', 'all')} tokens.")
    n, short = s["route_tokens"], s.get("unscored") or {}
    text = (f"Every row alike, the first {n} tokens of each are context only (a sequence or request router "
            f"chooses from them) and the tokens after them are scored.")
    if short and all(isinstance(v, int) for v in short.values()):
        counts = ", ".join(f"{d} {k}" for d, k in short.items() if k)
        text += f" Examples of at most {n} tokens score nothing: {counts or 'none'}."
    elif short:
        text += f" Rows of different tokenizers leave different examples of at most {n} tokens unscored (results.json)."
    return text


def markdown(results: EvalResults) -> str:
    s = results.settings
    domains = results.domains
    loss_counts = ", ".join(f"{d} {s['loss_examples'][d]}" for d in domains)
    lines = [
        "# Merge quality", "",
        f"Held-out set: `{s.get('held_out', 'heldout')}`. "
        f"Loss: mean negative log-likelihood per token (nats), token-weighted over the held-out examples "
        f"({loss_counts}); each example tokenized without special tokens and cut to {s['max_tokens']} tokens. "
        f"{scoring(s)} Math accuracy: exact match of the number after `Answer:` in "
        f"greedy output (at most {s['max_new_tokens']} new tokens) on the first {s['math_problems']} held-out problems; "
        f"math format: the share of those outputs that end in an `Answer: N` line at all. "
        f"Mixed: {s['mixed_examples']} examples ({s['mixed_per_domain']} per domain, seed {s['seed']}) interleaved.",
        "",
    ]
    if results.oracle:
        lines += ["In parentheses: the difference to the oracle row (each example scored by its own domain's expert).", ""]
    lines += main_table(results)
    mixed_lines = ["", "## Mixed set per source domain", "", "| model | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for row in results.all_rows:
        by = row.mixed.by_domain
        mixed_lines.append(f"| {row.name} | " + " | ".join(f"{by[d].loss:.3f}" if d in by else "–" for d in domains) + " |")
    lines += mixed_lines
    if gains := gain_table(results):
        lines += ["", "## Share of each expert's gain kept", "",
                  "(base loss - model loss) / (base loss - the domain expert's loss), per domain; mean loss "
                  "averages the domains' losses.", ""] + gains
    if acc := acceptance(results):
        lines += ["", "## Experts against the base", ""] + acc
    if rt := router_tables(results):
        lines += ["", "## Router load", "",
                  "Share of routing picks (top-k, so each token counts k times) per expert while scoring each "
                  "domain's loss set, averaged over layers; in parentheses the mean routing weight of those picks."] + rt
    if rt := routing_tables(results):
        lines += ["", "## Routing confusion (route compositions)", "",
                  "Each scored loss example goes to one member model, chosen by the request router from the text of "
                  "its context tokens; each math problem, from its prompt's first characters (4 per context token). In a top-k row (`-top2`) "
                  "the example goes to that member and its runners-up, mixed token by token; the table counts the "
                  "member that leads the mixture."] + rt
    lines += ["", "## Wall time", "", "| model | build s | loss s | mixed s | math s | total s |", "|---|---|---|---|---|---|"]
    for row in results.rows:
        t = row.timings
        loss = sum(v for k, v in t.items() if k.startswith("loss_"))
        lines.append(f"| {row.name} | {t['build']:.1f} | {loss:.1f} | {t['mixed']:.1f} | {t['math']:.1f} | {t['total']:.1f} |")
    lines += ["", f"Whole evaluation: {results.wall_s:.1f} s."]
    return "\n".join(lines) + "\n"


def bar_chart(results: EvalResults, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*results.domains, "mixed"]
    rows = results.all_rows
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(min(14.0, 3.0 + 0.3 * len(rows) * len(groups)), 4.5))
    for i, row in enumerate(rows):
        values = [row.domains[g].loss if g in row.domains else row.mixed.total.loss for g in groups]
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(groups))]
        ax.bar(xs, values, width, label=row.name, hatch="//" if row.kind == "oracle" else None)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("held-out loss (nats per token)")
    ax.set_title("Loss per domain per model (lower is better)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
