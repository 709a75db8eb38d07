"""`mergeserve train-router` for a route spec: the `learned` request router's classifier.

Each text is labelled by the member that scores it best per byte (router/request.py's
perplexity router: BTM's domain posterior, made hard); a linear classifier on the encoder
member's mean embedding then learns those labels, so that serving gets the perplexity
router's choice at the centroid router's cost.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from mergeserve.calibration import data_files, read_texts
from mergeserve.engine.engine import Engine
from mergeserve.experts import ExpertPool
from mergeserve.learn.compose import build_members
from mergeserve.router.request import PerplexityRouter, embed, encoder_of
from mergeserve.spec import CompositionSpec


def train_request_router(
    spec: CompositionSpec, members: list[Engine], texts: list[str], out: str | Path, steps: int = 300, lr: float = 0.05,
    max_chars: int = 512,
) -> dict:
    """Label each text (its first `max_chars` characters: a prompt's length) by the member with the
    best loss per byte, then fit a linear classifier on its mean embedding (Adam, cross-entropy, a
    little weight decay). Writes `out`; returns its summary."""
    texts = [t[:max_chars] for t in texts if t.strip()]
    if not texts:
        raise ValueError("no calibration text to label")
    labels = PerplexityRouter(members).scores(texts).argmax(1)  # [N]
    name, encoder = encoder_of(spec, members)
    x = embed(encoder, texts)  # [N, D]
    weight = torch.zeros(len(members), x.shape[1], requires_grad=True)
    bias = torch.zeros(len(members), requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(x @ weight.T + bias, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    loss = loss.detach()
    names = [e.name for e in spec.experts]
    accuracy = float(((x @ weight.T + bias).argmax(1) == labels).float().mean())
    summary = {"expert_names": names, "encoder": name, "texts": len(texts), "train_accuracy": accuracy,
               "labels": {n: int((labels == i).sum()) for i, n in enumerate(names)}, "loss": float(loss)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.detach().contiguous(), "bias": bias.detach().contiguous()}, str(out),
              metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in summary.items()} | {"format": "pt"})
    return summary


def train_from_files(spec: CompositionSpec, data: list[str | Path], out: str | Path, per_file: int = 64, seed: int = 0,
                     **options) -> dict:
    """`mergeserve train-router` for a route spec: build the members, read the text, train."""
    rng = random.Random(seed)
    texts = []
    for f in data_files(data):  # bad data fails before the builds
        found = read_texts(f)
        texts += rng.sample(found, min(per_file, len(found)))  # every file (domain) equally
    pool = ExpertPool()
    members = [Engine(c) for c in build_members(spec, pool)]
    return train_request_router(spec, members, texts, out, **options)
