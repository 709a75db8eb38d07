"""Request routers of `method: route`: each request goes to one whole model, chosen from its text.

Members may differ in family, size and tokenizer, so every router scores raw text:
- keywords: how often each member's keywords occur in the text (Symbolic-MoE's skill table);
- centroid: cosine of the text's mean token embedding, under one shared encoder (the smallest
  member's embedding, or the spec's `router.encoder`), against each member's example prompts;
- perplexity: the text's log-likelihood under each member: the probability of the same bytes,
  so members with different tokenizers compare fairly (the best per byte is the best in total),
  and its softmax is BTM's domain posterior under a uniform prior; one batched forward per member;
- learned: a linear classifier on the encoder's mean embedding, trained on unlabeled text
  labelled by the member that scores each text best (BTM's domain posterior, made hard): the
  perplexity router's choice at the centroid router's cost (learn/request_router.py trains it).

`scores(texts)` returns [N, M] logits over the members (higher is better); the backend adds a
request's `expert_bias`, masks members outside its `experts`, and takes the argmax (top_k > 1:
the top k, mixed with weights softmax(scores) over them).
"""

from __future__ import annotations

import json
import re
from typing import Protocol

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from mergeserve.engine.engine import Engine
from mergeserve.experts import CheckpointError
from mergeserve.spec import CompositionSpec


class RequestRouter(Protocol):
    def scores(self, texts: list[str]) -> torch.Tensor:
        """[N, M]: how well each member suits each text; higher is better."""


class KeywordRouter:
    def __init__(self, keywords: list[list[str]]) -> None:
        # One case-insensitive pattern per member; a keyword matches as a whole word or phrase.
        self.patterns = [re.compile("|".join(rf"(?<!\w){re.escape(k)}(?!\w)" for k in ks), re.IGNORECASE) for ks in keywords]

    def scores(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[float(len(p.findall(t))) for p in self.patterns] for t in texts])


def embed(encoder: Engine, texts: list[str]) -> torch.Tensor:
    """Each text's mean token embedding under the encoder member, unit length: [N, D]."""
    table = encoder.composed.embed
    rows = [table[encoder.tokenizer.encode(t, add_special_tokens=False) or [0]].float().mean(0) for t in texts]
    return F.normalize(torch.stack(rows), dim=-1)


class CentroidRouter:
    def __init__(self, encoder: Engine, prompts: list[list[str]]) -> None:
        self.encoder = encoder
        self.centroids = F.normalize(torch.stack([embed(encoder, ps).mean(0) for ps in prompts]), dim=-1)  # [M, D]

    def scores(self, texts: list[str]) -> torch.Tensor:
        return embed(self.encoder, texts) @ self.centroids.T


class LearnedRouter:
    def __init__(self, encoder: Engine, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.encoder, self.weight, self.bias = encoder, weight, bias  # [M, D], [M]

    def scores(self, texts: list[str]) -> torch.Tensor:
        return torch.log_softmax(embed(self.encoder, texts) @ self.weight.T + self.bias, dim=-1)


class PerplexityRouter:
    def __init__(self, members: list[Engine]) -> None:
        self.members = members

    def scores(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self._log_likelihood(m, texts) for m in self.members], dim=1)

    @staticmethod
    def _log_likelihood(member: Engine, texts: list[str]) -> torch.Tensor:
        """Summed log-probability of each text under one member, all texts in one batched score: [N].
        A member composition is dense (no router): its forward keeps no state, so this may run
        beside the executor's steps of the same engine."""
        ids = [member.tokenizer.encode(t, add_special_tokens=False)[: member.config.max_model_len - 1] for t in texts]
        bos = member.tokenizer.bos_token_id
        ids = [([bos] if bos is not None else []) + seq for seq in ids]  # the first text token is scored too
        return torch.stack([lp.sum() if lp.numel() else torch.tensor(0.0) for lp in member.score(ids)])


def top_members(scores: torch.Tensor, top_k: int, vocab: list[int]) -> list[int]:
    """One request's members from the router's `scores` [M] (bias added; -inf excluded): the best,
    then up to top_k - 1 runners-up whose tokenizer has the best's vocabulary (`vocab`, a key per
    member): token ids must mean the same text in every distribution that is mixed."""
    order = scores.argsort(descending=True).tolist()
    lead = order[0]
    mates = [i for i in order[1:] if scores[i] > -torch.inf and vocab[i] == vocab[lead]]
    return [lead, *mates][:top_k]


def tokenizer_key(tokenizer) -> int:
    """Equal for tokenizers whose every token id stands for the same string."""
    return hash(tuple(sorted(tokenizer.get_vocab().items())))


def build_request_router(spec: CompositionSpec, members: list[Engine]) -> RequestRouter:
    kind = spec.router.kind
    if kind == "keywords":
        return KeywordRouter([e.keywords for e in spec.experts])
    if kind == "perplexity":
        return PerplexityRouter(members)
    name, encoder = encoder_of(spec, members)
    if kind == "learned":
        weight, bias = load_classifier(spec.router.weights, [e.name for e in spec.experts], name, encoder.composed.embed.shape[1])
        return LearnedRouter(encoder, weight, bias)
    return CentroidRouter(encoder, [e.prompts for e in spec.experts])


def encoder_of(spec: CompositionSpec, members: list[Engine]) -> tuple[str, Engine]:
    """The member whose embedding encodes prompts: router.encoder, else the smallest member."""
    names = [e.name for e in spec.experts]
    i = names.index(spec.router.encoder) if spec.router.encoder else \
        min(range(len(members)), key=lambda j: sum(t.numel() for t in members[j].composed.tensors()))
    return names[i], members[i]


def load_classifier(path: str, names: list[str], encoder: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learned request router's weight [M, D] and bias [M], rows in the order of `names` (safetensors only)."""
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a request router written by `mergeserve train-router` ({e})") from e
    theirs = json.loads(meta.get("expert_names", "null"))
    if not isinstance(theirs, list) or sorted(theirs) != sorted(names):
        raise CheckpointError(f"{path}: a request router for the members {theirs}, the spec has {names}")
    if meta.get("encoder") != encoder or weight.shape != (len(names), dim):
        raise CheckpointError(f"{path}: trained on {meta.get('encoder')!r}'s embedding (weight {list(weight.shape)}); "
                              f"the spec encodes with {encoder!r} ({dim} wide)")
    order = [theirs.index(n) for n in names]
    return weight[order].float(), bias[order].float()
