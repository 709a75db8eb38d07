"""`mergeserve serve | export | spec-schema | eval | train-router | tune-merge | fisher | shrink | calibrate-router | ab report`: a thin argparse front end; each subcommand imports what it needs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mergeserve.experts import CheckpointError
from mergeserve.spec import SpecError, load_serve_config

EXIT_BAD_INPUT = 2  # argparse's own code for a usage error


def _serve(args: argparse.Namespace) -> int:
    from mergeserve.server.serve import serve

    try:
        config = load_serve_config(args.config)
        overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        serve(config.model_copy(update=overrides), Path(args.config).parent.resolve(), args.config if args.watch else None)
    except (SpecError, CheckpointError) as e:
        return _bad_input(args, e)
    return 0


def _export(args: argparse.Namespace) -> int:
    from mergeserve.export import export_spec

    try:
        out = export_spec(args.spec, args.out, args.dtype)
    except ValueError as e:  # a bad spec or source (SpecError, CheckpointError), or what Mixtral cannot represent
        return _bad_input(args, e)
    print(f"wrote {out}")
    return 0


def _spec_schema(args: argparse.Namespace) -> int:
    from mergeserve.spec import composition_schema, serve_schema

    print(json.dumps(serve_schema() if args.serve else composition_schema(), indent=1))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from mergeserve.eval.harness import evaluate
    from mergeserve.eval.report import write_all, write_sets
    from mergeserve.eval.scoring import EvalSettings

    settings = EvalSettings(
        max_tokens=args.max_tokens, per_domain=args.examples, mixed_per_domain=args.mixed,
        math_examples=args.math, max_new_tokens=args.max_new_tokens, seed=args.seed, route_tokens=args.route_tokens,
    )
    done = {}
    for held_out in args.sets:
        out = args.out / held_out if len(args.sets) > 1 else args.out
        earlier = out / "results.json"
        reuse = json.loads(earlier.read_text()) if args.reuse and earlier.is_file() else None
        try:
            done[held_out] = evaluate(args.spec, args.data, settings, oracle=args.oracle, domains=tuple(args.domains or ()) or None,
                                      reuse=reuse, held_out=held_out)
        except (ValueError, OSError) as e:  # a bad spec or source (SpecError, CheckpointError), missing data
            return _bad_input(args, e)
        for path in write_all(out, done[held_out]):
            print(f"wrote {path}")
    if len(done) > 1:
        print(f"wrote {write_sets(args.out, done)}")
    return 0


def _train_router(args: argparse.Namespace) -> int:
    import torch

    from mergeserve.learn.token_router import RouterTrainConfig, train_router
    from mergeserve.spec import load_composition

    torch.set_num_threads(args.threads)
    try:
        if (spec := load_composition(args.spec)).routes_requests:
            return _train_request_router(spec, args)
        cfg = RouterTrainConfig(
            steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
            warmup_steps=args.warmup_steps, alpha=args.alpha, seed=args.seed, anchor=args.anchor, mixed=args.mixed,
            eval_every=args.eval_every, val_rows=args.val_rows,
        )
        result = train_router(args.spec, args.data, args.out, cfg, val=args.val)
    except (ValueError, OSError) as e:  # bad settings, spec, source or data file, or a base Mixtral cannot run
        return _bad_input(args, e)
    print(f"next-token loss {result.lm_loss[0]:.4f} -> {result.final_lm_loss:.4f}, "
          f"load-balancing loss {result.aux_loss[0]:.4f} -> {result.final_aux_loss:.4f} (last steps' mean)")
    if result.val_loss:
        print(f"validation loss {result.val_loss[0][1]:.4f} at the start, {dict(result.val_loss)[result.best_step]:.4f} "
              f"at step {result.best_step}: kept")
    print(f"wrote {args.out}")
    return 0


def _train_request_router(spec, args: argparse.Namespace) -> int:
    """A route spec's request classifier: texts labelled by the member scoring them best."""
    from mergeserve.learn.request_router import train_from_files

    summary = train_from_files(spec, args.data, args.out, seed=args.seed)
    print(f"labelled {summary['texts']} texts by the best member per byte: {summary['labels']}; "
          f"classifier train accuracy {summary['train_accuracy']:.1%} on {summary['encoder']}'s embedding")
    print(f"wrote {args.out}")
    return 0


def _tune_merge(args: argparse.Namespace) -> int:
    import torch

    from mergeserve.learn.tune import TuneConfig, tune_merge

    torch.set_num_threads(args.threads)
    try:
        cfg = TuneConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                         objective=args.objective, granularity=args.granularity, fine_fraction=args.fine_fraction,
                         reg=args.reg, seed=args.seed)
        result = tune_merge(args.spec, _expert_data(args.data), args.out, cfg)
    except (ValueError, OSError) as e:  # bad settings, spec, source or data
        return _bad_input(args, e)
    print(f"loss {result.loss[0]:.4f} -> {result.loss[-1]:.4f}; coefficients per expert, mean over layers: "
          f"{[round(x, 3) for x in result.coefficients.flatten(0, -2).mean(0).tolist()]}")
    if result.fine_layers:
        print(f"attention and FFN apart in the most important layers: {result.fine_layers}")
    print(f"wrote {args.out}")
    return 0


def _fisher(args: argparse.Namespace) -> int:
    import torch

    from mergeserve.learn.fisher import FisherConfig, compute_fishers

    torch.set_num_threads(args.threads)
    try:
        paths = compute_fishers(args.spec, _expert_data(args.data), args.out, FisherConfig(args.samples, args.seq_len))
    except (ValueError, OSError) as e:
        return _bad_input(args, e)
    for path in paths:
        print(f"wrote {path}")
    return 0


def _shrink(args: argparse.Namespace) -> int:
    import torch

    from mergeserve.learn.shrink import shrink

    torch.set_num_threads(args.threads)
    try:
        path = shrink(args.spec, args.to, args.out, args.data, args.metrics, args.samples, args.seq_len, args.merge)
    except (ValueError, OSError) as e:
        return _bad_input(args, e)
    print(f"wrote {path}")
    return 0


def _calibrate_router(args: argparse.Namespace) -> int:
    import torch

    from mergeserve.learn.router_temperature import calibrate

    torch.set_num_threads(args.threads)
    out = args.out or args.spec.with_name(f"{args.spec.stem}.calibrated.yaml")
    try:
        t, offsets, path = calibrate(args.spec, _expert_data(args.data), out, chat=not args.plain)
    except (ValueError, OSError) as e:
        return _bad_input(args, e)
    print(f"router.inverse_temperature = {t:.4g}, router.offsets = {offsets}; wrote {path}")
    return 0


def _ab_report(args: argparse.Namespace) -> int:
    import httpx

    from mergeserve.server.ab.replicas import fetch, replicas_report, table

    try:
        body = replicas_report(fetch(args.url), args.alias)
    except (httpx.HTTPError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(body, indent=1) if args.json else table(body))
    return 0


def _expert_data(items: list[str]) -> dict[str, list[Path]]:
    """`NAME=PATH` pairs and folders with a subfolder per expert -> expert name -> paths."""
    data: dict[str, list[Path]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if sep:
            data.setdefault(name, []).append(Path(path))
        elif Path(item).is_dir():
            for sub in sorted(p for p in Path(item).iterdir() if p.is_dir()):
                data.setdefault(sub.name, []).append(sub)
        else:
            raise ValueError(f"{item}: give NAME=PATH, or a folder with a subfolder per expert")
    return data


def _bad_input(args: argparse.Namespace, error: Exception) -> int:
    print(f"mergeserve {args.command}: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergeserve", description="Compose expert checkpoints into an MoE and serve it.")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the compositions of a config over an OpenAI-compatible API")
    serve.add_argument("--config", required=True, type=Path, help="serve config (YAML)")
    serve.add_argument("--host", help="overrides the config's host")
    serve.add_argument("--port", type=_port, help="overrides the config's port")
    serve.add_argument("--watch", action="store_true",
                       help="apply edits of the config file while serving: changed compositions hot-swap, "
                            "removed ones drain, aliases follow (a mounted ConfigMap)")
    serve.set_defaults(run=_serve)

    export = sub.add_parser("export", help="write a composition as a Hugging Face checkpoint (Mixtral for an MoE)")
    export.add_argument("--spec", required=True, type=Path, help="composition spec (YAML)")
    export.add_argument("--out", required=True, type=Path, help="output folder")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.set_defaults(run=_export)

    schema = sub.add_parser("spec-schema", help="print the JSON Schema of a composition spec (for editors that validate YAML); "
                            "docs/reference/ renders it (python -m mergeserve.spec.reference)")
    schema.add_argument("--serve", action="store_true", help="the schema of a serve config instead")
    schema.set_defaults(run=_spec_schema)

    from mergeserve.zoo import zoo_dir

    from mergeserve.eval.datasets import SETS
    from mergeserve.eval.scoring import EvalSettings

    d = EvalSettings()
    ev = sub.add_parser("eval", help="score compositions on the zoo's held-out sets: loss per domain, math accuracy, mixed set")
    ev.add_argument("--spec", required=True, action="extend", nargs="+", type=Path,
                    help="composition specs (YAML), one row each; repeatable")
    ev.add_argument("--out", required=True, type=Path, help="folder for results.json, results.md, loss.png")
    ev.add_argument("--oracle", action="store_true", help="add the oracle row (needs a single-expert spec per domain)")
    ev.add_argument("--reuse", action="store_true",
                    help="keep the rows of OUT/results.json whose spec, sources and settings are unchanged")
    ev.add_argument("--data", type=Path, default=zoo_dir() / "data", help="folder of <domain>/<set>.jsonl (default: %(default)s)")
    ev.add_argument("--sets", nargs="+", choices=SETS, default=["heldout"],
                    help="held-out sets to score: heldout (training's own sources), other (other sources and phrasings); "
                         "with several, OUT/<set>/ each and OUT/results.md for all (default: %(default)s)")
    ev.add_argument("--domains", nargs="+",
                    help="the domains to score, each a subfolder of --data (default: the zoo's three)")
    ev.add_argument("--examples", type=_positive, default=d.per_domain, help="loss examples per domain: the first N of each file (default: %(default)s)")
    ev.add_argument("--all-examples", dest="examples", action="store_const", const=None, help="every held-out example")
    ev.add_argument("--mixed", type=_positive, default=d.mixed_per_domain, help="mixed-set examples per domain (default: %(default)s)")
    ev.add_argument("--math", type=_positive, default=d.math_examples, help="math problems for accuracy, the first N (default: %(default)s)")
    ev.add_argument("--max-tokens", type=_positive, default=d.max_tokens, help="tokens kept per loss example (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=_positive, default=d.max_new_tokens, help="generated tokens per math problem (default: %(default)s)")
    ev.add_argument("--route-tokens", type=_positive, default=d.route_tokens,
                    help="each scored text's first N tokens are context only: routers choose from them, every row scores the rest (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=d.seed, help="seed of the mixed set's sample and order (default: %(default)s)")
    ev.set_defaults(run=_eval)

    tr = sub.add_parser("train-router", help="train only the router rows of an MoE spec on unlabeled text (next-token + load-balancing loss); "
                                             "for a route spec, a request classifier labelled by the member that scores each text best")
    tr.add_argument("--spec", required=True, type=Path, help="MoE or route composition spec (YAML); an MoE's router is the starting point")
    tr.add_argument("--data", required=True, nargs="+", type=Path,
                    help=".jsonl files (a \"text\" field per line), .txt files or folders of them; mixed evenly across files")
    tr.add_argument("--out", required=True, type=Path, help="router file to write (.safetensors)")
    tr.add_argument("--steps", type=_positive, default=50, help="optimizer steps (default: %(default)s)")
    tr.add_argument("--batch-size", type=_positive, default=4, help="sequences per step (default: %(default)s)")
    tr.add_argument("--seq-len", type=_positive, default=256, help="tokens per sequence (default: %(default)s)")
    tr.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate of the router rows (default: %(default)s)")
    tr.add_argument("--warmup-steps", type=int, default=5, help="linear warmup before the cosine decay (default: %(default)s)")
    tr.add_argument("--alpha", type=float, default=0.01, help="weight of the load-balancing loss (default: %(default)s)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the data order (default: %(default)s)")
    tr.add_argument("--anchor", type=float, default=0.0,
                    help="weight of the squared distance of the rows to their training-free start (default: %(default)s)")
    tr.add_argument("--mixed", action="store_true", help="each row four segments from the files in turn: rows switch domain mid-sequence")
    tr.add_argument("--val", nargs="+", type=Path,
                    help="validation texts (.jsonl, .txt or folders), e.g. other sources than --data's: measured every "
                         "--eval-every steps, the best rows kept (early stopping)")
    tr.add_argument("--eval-every", type=_positive, default=10, help="steps between validation measurements (default: %(default)s)")
    tr.add_argument("--val-rows", type=_positive, default=8, help="validation sequences of --seq-len tokens (default: %(default)s)")
    tr.add_argument("--threads", type=_positive, default=2, help="torch CPU threads; 1 where other jobs share the cores (default: %(default)s)")
    tr.set_defaults(run=_train_router)

    from mergeserve.learn.tune import TuneConfig

    t = TuneConfig()
    tm = sub.add_parser("tune-merge", help="learn a task-vector merge's coefficient per expert per layer from each expert's unlabeled text")
    tm.add_argument("--spec", required=True, type=Path, help="a dense task-vector merge or MergeME spec of LoRA experts (YAML)")
    tm.add_argument("--data", required=True, nargs="+",
                    help="NAME=PATH per expert (.jsonl/.txt files or folders), or folders holding a subfolder per expert name")
    tm.add_argument("--out", required=True, type=Path, help="coefficients file to write (.safetensors); a spec names it as merge.coefficients")
    tm.add_argument("--objective", choices=["expert_merging", "entropy"], default=t.objective,
                    help="match each expert's states and logits on its text (Expert Merging), or minimise entropy (AdaMerging) (default: %(default)s)")
    tm.add_argument("--granularity", choices=["layer", "module", "important"], default=t.granularity,
                    help="a coefficient per expert per layer; per layer for attention and FFN apart; or apart only in the "
                         "most important layers, Expert Merging++ (default: %(default)s)")
    tm.add_argument("--fine-fraction", type=float, default=t.fine_fraction,
                    help="with --granularity important: the share of layers split into attention and FFN (default: %(default)s)")
    tm.add_argument("--steps", type=_positive, default=t.steps, help="optimizer steps (default: %(default)s)")
    tm.add_argument("--batch-size", type=_positive, default=t.batch_size, help="sequences of each expert's text per step (default: %(default)s)")
    tm.add_argument("--seq-len", type=_positive, default=t.seq_len, help="tokens per sequence (default: %(default)s)")
    tm.add_argument("--lr", type=float, default=t.lr, help="Adam learning rate of the coefficients (default: %(default)s)")
    tm.add_argument("--reg", type=float, default=t.reg, help="weight of the squared distance to the spec's own coefficients (default: %(default)s)")
    tm.add_argument("--seed", type=int, default=t.seed, help="seed of the data order (default: %(default)s)")
    tm.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: %(default)s)")
    tm.set_defaults(run=_tune_merge)

    fi = sub.add_parser("fisher", help="compute and cache each expert's diagonal Fisher on its own text (for method: fisher)")
    fi.add_argument("--spec", required=True, type=Path, help="a spec listing the experts (YAML)")
    fi.add_argument("--data", required=True, nargs="+", help="NAME=PATH per expert, or folders holding a subfolder per expert name")
    fi.add_argument("--out", required=True, type=Path, help="folder for <expert>.safetensors; a fisher spec names it as merge.fisher")
    fi.add_argument("--samples", type=_positive, default=16, help="sequences per expert, one backward each (default: %(default)s)")
    fi.add_argument("--seq-len", type=_positive, default=128, help="tokens per sequence (default: %(default)s)")
    fi.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: %(default)s)")
    fi.set_defaults(run=_fisher)

    cr = sub.add_parser("calibrate-router", help="fit a sequence router's inverse temperature and per-expert offsets on "
                        "prompts labelled with their expert (temperature scaling); writes the spec with them")
    cr.add_argument("--spec", required=True, type=Path, help="a spec with a perplexity or task_vector router (YAML)")
    cr.add_argument("--data", required=True, nargs="+",
                    help="NAME=PATH (an expert's prompts: .jsonl/.txt files or folders), or a folder with a subfolder per expert")
    cr.add_argument("--out", type=Path, help="the spec to write (default: SPEC's folder, <name>.calibrated.yaml)")
    cr.add_argument("--plain", action="store_true", help="score the texts as they are (default: each is a chat's user message)")
    cr.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: %(default)s)")
    cr.set_defaults(run=_calibrate_router)

    ab = sub.add_parser("ab", help="A/B aliases: `ab report` compares an alias's targets over one or more replicas")
    ab_sub = ab.add_subparsers(dest="ab_command", required=True)
    rep = ab_sub.add_parser("report", help="each target since the alias's weights last changed, and each variant against "
                            "the control with an always-valid verdict, summed over the replicas' /metrics")
    rep.add_argument("--url", required=True, nargs="+", help="each replica's base URL, e.g. http://127.0.0.1:8000")
    rep.add_argument("--alias", required=True)
    rep.add_argument("--json", action="store_true", help="the report as JSON (default: a table)")
    rep.set_defaults(run=_ab_report)

    sh = sub.add_parser("shrink", help="merge experts whose routing and weights are alike into fewer experts (M-SMoE); writes a spec")
    sh.add_argument("--spec", required=True, type=Path, help="an MoE spec of LoRA experts (YAML)")
    sh.add_argument("--to", required=True, type=_positive, help="number of experts to keep")
    sh.add_argument("--out", required=True, type=Path, help="folder for the merged adapters and spec.yaml")
    stats = sh.add_mutually_exclusive_group(required=True)
    stats.add_argument("--data", nargs="+", type=Path, help="calibration text (.jsonl/.txt files or folders) for the routing statistics")
    stats.add_argument("--metrics", help="a live server's /metrics URL: its expert_tokens_total for this composition")
    sh.add_argument("--merge", choices=["usage", "sum"], default="usage",
                    help="a group's delta: its members' usage-weighted average (M-SMoE) or their sum (default: %(default)s)")
    sh.add_argument("--samples", type=_positive, default=8, help="calibration sequences (default: %(default)s)")
    sh.add_argument("--seq-len", type=_positive, default=256, help="tokens per sequence (default: %(default)s)")
    sh.add_argument("--threads", type=_positive, default=2, help="torch CPU threads (default: %(default)s)")
    sh.set_defaults(run=_shrink)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
