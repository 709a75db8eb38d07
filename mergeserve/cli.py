"""`mergeserve serve | export | eval`: a thin argparse front end; each subcommand imports what it needs."""

from __future__ import annotations

import argparse
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
        serve(config.model_copy(update=overrides))
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


def _eval(args: argparse.Namespace) -> int:
    from mergeserve.eval.harness import EvalSettings, evaluate
    from mergeserve.eval.report import write_all

    settings = EvalSettings(
        max_tokens=args.max_tokens, per_domain=args.examples, mixed_per_domain=args.mixed,
        math_examples=args.math, max_new_tokens=args.max_new_tokens, seed=args.seed,
    )
    try:
        results = evaluate(args.spec, args.data, settings, oracle=args.oracle)
    except (ValueError, OSError) as e:  # a bad spec or source (SpecError, CheckpointError), missing data
        return _bad_input(args, e)
    for path in write_all(args.out, results):
        print(f"wrote {path}")
    return 0


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
    serve.set_defaults(run=_serve)

    export = sub.add_parser("export", help="write a composition as a Hugging Face checkpoint (Mixtral for an MoE)")
    export.add_argument("--spec", required=True, type=Path, help="composition spec (YAML)")
    export.add_argument("--out", required=True, type=Path, help="output folder")
    export.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    export.set_defaults(run=_export)

    from mergeserve.zoo import ZOO_DIR

    ev = sub.add_parser("eval", help="score compositions on the zoo's held-out sets: loss per domain, math accuracy, mixed set")
    ev.add_argument("--spec", required=True, action="append", type=Path, help="composition spec (YAML); repeat for more rows")
    ev.add_argument("--out", required=True, type=Path, help="folder for results.json, results.md, loss.png")
    ev.add_argument("--oracle", action="store_true", help="add the oracle row (needs a single-expert spec per domain)")
    ev.add_argument("--data", type=Path, default=ZOO_DIR / "data", help="folder of <domain>/heldout.jsonl (default: %(default)s)")
    ev.add_argument("--examples", type=_positive, help="loss examples per domain: the first N of each file (default: all)")
    ev.add_argument("--mixed", type=_positive, default=40, help="mixed-set examples per domain (default: %(default)s)")
    ev.add_argument("--math", type=_positive, default=100, help="math problems for accuracy, the first N (default: %(default)s)")
    ev.add_argument("--max-tokens", type=_positive, default=256, help="tokens kept per loss example (default: %(default)s)")
    ev.add_argument("--max-new-tokens", type=_positive, default=160, help="generated tokens per math problem (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the mixed set's sample and order (default: %(default)s)")
    ev.set_defaults(run=_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
