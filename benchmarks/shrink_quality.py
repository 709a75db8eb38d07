"""Quality against the number of experts: a composition and its `mergeserve shrink` versions.

Reads the merge-quality results (benchmarks/results/merge_quality/results.json, where the
eval harness scored the full composition and its shrunk specs on the same held-out data)
and writes a table and a plot: each domain's loss, the share of the full composition's gain
over the base each keeps, and math accuracy.

    python benchmarks/shrink_quality.py [--results FILE...] [--rows btx btx-2 btx-1 btx-2-sum btx-1-sum] [--out benchmarks/results/shrink]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def table(results: dict, names: list[str]) -> tuple[list[str], list[dict]]:
    rows = {r["name"]: r for r in results["rows"]}
    base, full = rows["base"], rows[names[0]]
    domains = results["domains"]
    points = []
    for name in names:
        row = rows[name]
        losses = {d: row["domains"][d]["loss"] for d in domains}
        gain = sum(base["domains"][d]["loss"] - losses[d] for d in domains)
        full_gain = sum(base["domains"][d]["loss"] - full["domains"][d]["loss"] for d in domains)
        experts = len(row.get("experts") or [row["expert"]])  # a one-expert row names its expert alone
        points.append({"name": name, "experts": experts, "losses": losses, "kept": gain / full_gain,
                       "math_accuracy": row["math"]["accuracy"]})
    lines = [f"| composition | experts | {' | '.join(f'{d} loss' for d in domains)} | gain over the base kept | math acc |",
             "|---|---|" + "---|" * len(domains) + "---|---|"]
    for p in points:
        lines.append(f"| {p['name']} | {p['experts']} | " + " | ".join(f"{p['losses'][d]:.3f}" for d in domains)
                     + f" | {p['kept']:.1%} | {p['math_accuracy']:.0%} |")
    return lines, points


def plot(points: list[dict], domains: list[str], path: Path) -> None:
    """One line per domain and merge mode: the full composition, then its usage-averaged
    (`--merge usage`) shrinks solid and its summed (`--merge sum`) shrinks dashed."""
    fig, ax = plt.subplots(figsize=(6, 4))
    full, rest = points[0], points[1:]
    experts = [p["experts"] for p in points]
    for mode, style in (("usage", "-"), ("sum", "--")):
        series = [full] + [p for p in rest if p["name"].endswith("-sum") == (mode == "sum")]
        if len(series) == 1:
            continue
        for i, d in enumerate(domains):
            ax.plot([p["experts"] for p in series], [p["losses"][d] for p in series], style, marker="o", color=f"C{i}",
                    label=f"{d} loss ({mode})")
    ax.set_xlabel("experts")
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_xticks(sorted(set(experts)))
    ax.invert_xaxis()
    ax.legend()
    ax.set_title("Quality against the number of experts (mergeserve shrink)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, nargs="+",
                   default=[RESULTS / "merge_quality" / "results.json", RESULTS / "shrink_sum" / "results.json"],
                   help="eval results.json files scored with the same settings; their rows are joined by name")
    p.add_argument("--rows", nargs="+", default=["btx", "btx-2", "btx-1", "btx-2-sum", "btx-1-sum"],
                   help="the full composition first, then its shrunk versions (names ending -sum: merged with --merge sum)")
    p.add_argument("--out", type=Path, default=RESULTS / "shrink")
    args = p.parse_args()
    files = [json.loads(f.read_text()) for f in args.results if f.is_file()]
    if any(f["settings"] != files[0]["settings"] for f in files):
        raise SystemExit("the results files were scored with different settings: their rows do not compare")
    results = files[0] | {"rows": list({r["name"]: r for f in files for r in f["rows"]}.values())}
    lines, points = table(results, args.rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(points, results["domains"], args.out.with_suffix(".png"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
