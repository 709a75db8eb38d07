"""MergeME's heterogeneous merge: whole members of different shapes behind one embedding and head.

Members keep their own layers (any family, depth or width) and share one vocabulary. Their
embeddings (and heads) are zero-padded to the widest member's width D_s and averaged into one
table; each member reads it through an input projector P [D_s, D] and writes its logits through
an output projector Q [D, D_s]:

    x = embed_s[t] @ P        logits = (h @ Q) @ head_s.T

Both are fitted in closed form, so nothing back-propagates through the frozen members:
- P = argmin ||embed_s P - embed_own||, least squares over the vocabulary;
- Q = argmin ||H Q head_s.T - H head_own.T||, the member's logits through the shared head
  against its own, over any final states H [N, D]. Each row of H Q head_s.T lies in the span of
  head_s's columns, so the best a row can do is the projection of its own logits onto that span,
  and Q = head_own.T head_s (head_s.T head_s)^-1 reaches it for every H at once: the fit needs no
  calibration states, and holds for states it never saw.
Requests pick a member with a request router (router/request.py); MergeME's is a logistic model
on the mean token embedding, the `learned` request router over the shared table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from mergeserve.composition import ComposedModel


@dataclass(frozen=True)
class Fit:
    """How closely one member's projectors reproduce its own tables (relative residuals)."""

    embedding: float  # ||embed_s P - embed_own|| / ||embed_own||
    head: float  # ||head_s Q.T - head_own|| / ||head_own||: the logits' residual for the worst-placed states


def check_vocabulary(members: list[ComposedModel]) -> None:
    first = members[0]
    for m in members[1:]:
        if m.embed.shape[0] != first.embed.shape[0] or m.tokenizer.get_vocab() != first.tokenizer.get_vocab():
            raise ValueError(f"method=hetero shares one embedding: members {first.name!r} and {m.name!r} have different "
                             "vocabularies (use method=route for members with tokenizers of their own)")


def padded(table: torch.Tensor, width: int) -> torch.Tensor:
    """[V, D] -> [V, width], zeros on the right."""
    return F.pad(table.float(), (0, width - table.shape[1]))


def shared_tables(members: list[ComposedModel]) -> tuple[torch.Tensor, torch.Tensor]:
    """The averaged, zero-padded embedding and head, [V, D_s] each (one tensor when every member ties them)."""
    width = max(m.embed.shape[1] for m in members)
    embed = torch.stack([padded(m.embed, width) for m in members]).mean(0)
    if all(m.lm_head is m.embed for m in members):
        return embed, embed
    return embed, torch.stack([padded(m.lm_head, width) for m in members]).mean(0)


def input_projector(shared: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """P [D_s, D] = argmin ||shared P - own||."""
    return torch.linalg.lstsq(shared.double(), own.double()).solution.float()


def output_projector(own_head: torch.Tensor, shared_head: torch.Tensor) -> torch.Tensor:
    """Q [D, D_s] = head_own.T head_s (head_s.T head_s)^-1 (see the module docstring)."""
    own, shared = own_head.double(), shared_head.double()
    return torch.linalg.solve(shared.T @ shared, shared.T @ own).T.float()


def share(members: list[ComposedModel]) -> tuple[list[ComposedModel], list[Fit]]:
    """The members reading and writing one shared embedding and head, and how well each fits."""
    check_vocabulary(members)
    embed32, head32 = shared_tables(members)
    embed = embed32.to(members[0].embed.dtype)
    head = embed if head32 is embed32 else head32.to(members[0].lm_head.dtype)
    out, fits = [], []
    for m in members:
        p, q = input_projector(embed, m.embed), output_projector(m.lm_head, head)
        fits.append(Fit(embedding=relative(embed.float() @ p, m.embed.float()), head=relative(head.float() @ q.T, m.lm_head.float())))
        out.append(replace(m, embed=embed, lm_head=head, embed_proj=p, head_proj=q))
    return out, fits


def relative(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-12))
