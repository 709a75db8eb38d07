"""`python -m mergeserve.zoo [data|other|train|all|score] [--domain D|all] [--full] [--steps N] [--fresh] [--force]`"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from mergeserve.zoo import DOMAINS, FULL_DOMAINS, ROOT_ENV, build_dir, zoo_dir
from mergeserve.zoo.german_data import MissingHandbook


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mergeserve.zoo", description="Build the expert zoo's data splits and LoRA experts, "
                                f"under examples/zoo and build/zoo of the current directory (or of ${ROOT_ENV}).")
    p.add_argument("command", nargs="?", default="all", choices=["data", "other", "train", "all", "score"],
                   help="other: write the second held-out sets (other sources and phrasings); "
                        "score: rescore every built expert's card on today's held-out splits")
    p.add_argument("--domain", default="all", choices=[*DOMAINS, "all"], help="one domain, or all in the order math, german, code")
    p.add_argument("--full", action="store_true",
                   help=f"full fine-tunes (every projection) into {build_dir() / 'full'}; `all` means {', '.join(FULL_DOMAINS)}")
    p.add_argument("--keep-layers", type=int, default=0, help="with --full: depth-prune the base to this many layers first")
    p.add_argument("--arch", choices=["llama", "qwen2"], default="llama", help="with --full: train the base as this architecture")
    p.add_argument("--steps", type=int, help="training steps per expert, of its first stage for a LoRA (default: mergeserve.zoo.train.LORA)")
    p.add_argument("--fresh", action="store_true", help="discard a resumable checkpoint and train from step 0")
    p.add_argument("--force", action="store_true", help="train even where examples/zoo/<domain> already has an adapter")
    args = p.parse_args(argv)
    domains = (FULL_DOMAINS if args.full else DOMAINS) if args.domain == "all" else (args.domain,)

    if args.command == "score":
        from mergeserve.zoo.score import score_all

        score_all()
        return 0
    if args.command == "other":
        from mergeserve.zoo.other_sets import write_other

        for domain in domains:
            try:
                scored, dev = write_other(domain)
                print(f"{domain}: {scored} held-out and {dev} dev examples from other sources")
            except MissingHandbook as e:
                print(f"mergeserve.zoo: {e}", file=sys.stderr)
                return 1
        return 0
    if args.command in ("data", "all"):
        from mergeserve.zoo.data import write_splits

        for domain in domains:
            try:
                train, heldout = write_splits(domain)
            except MissingHandbook as e:
                print(f"mergeserve.zoo: {e}", file=sys.stderr)
                return 1
            print(f"{domain}: {train} train / {heldout} held-out examples")
    if args.command in ("train", "all"):
        from mergeserve.zoo.config import TrainConfig
        from mergeserve.zoo.train import FULL_LR, FULL_STEPS, LORA, train

        for domain in domains:
            if args.full:
                cfg = TrainConfig(domain, steps=args.steps or FULL_STEPS[domain], lr=FULL_LR, full=True,
                                  keep_layers=args.keep_layers, arch=args.arch)
                built = build_dir() / "full" / cfg.tag / "model.safetensors"
            else:
                cfg = replace(LORA[domain], steps=args.steps or LORA[domain].steps)
                built = zoo_dir() / domain / "adapter_model.safetensors"
            if built.is_file() and not args.force:
                print(f"{domain}: {built} already exists (--force retrains it)")
                continue
            train(cfg, fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
