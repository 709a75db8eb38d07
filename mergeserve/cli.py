"""`mergeserve serve | export`: a thin argparse front end; each subcommand imports what it needs."""

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


def _bad_input(args: argparse.Namespace, error: Exception) -> int:
    print(f"mergeserve {args.command}: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {port}")
    return port


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
