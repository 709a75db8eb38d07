"""Routers, one model per kind, in three families chosen by the composition's method.

- Token routers (btx, mergeme): a gate per layer scores every token.
- Mixture routers (btx, mergeme; MergeME's sequence-level routing): one mixture of experts per
  request, chosen once from its prompt.
- Request routers (method route): one whole model (or the top k sharing a tokenizer) per request.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import Field, model_validator

from mergeserve.spec.base import Strict, refuse_moved, tagged_union


class TokenRouterSpec(Strict):
    family: ClassVar[str] = "token"
    kind: str
    top_k: int = Field(2, ge=1)  # experts each token is routed to, their weights a softmax over these
    seed: int = 0  # the seed of random rows (kind random) and of Arrow's SVD
    # What the experts' attention becomes: `averaged` shares one attention merged as the method says
    # (BTX averages, MergeME merges task vectors); `routed` keeps LoRA experts' attention deltas and
    # routes them per token with a gate of its own, reading the input-normed state.
    attention: Literal["averaged", "routed"] = "averaged"

    @model_validator(mode="before")
    @classmethod
    def _attention(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("attention") in ("separate", "merged", "dynamic"):
            raise ValueError(f"router.attention={data['attention']} does not apply to kind={data.get('kind')}: "
                             "token routers take averaged, routed")
        return data

    @property
    def keeps_attention_deltas(self) -> bool:
        """Whether the experts' attention stays per expert, as deltas over the base's."""
        return self.attention == "routed"


class RowRouterSpec(TokenRouterSpec):
    # Gate rows are multiplied by this: the router logit margin between an expert's own domain and
    # the rest. Larger is sharper.
    scale: float = Field(4.0, gt=0)


class HiddenRouterSpec(RowRouterSpec):
    """Each row from the mean hidden state of the expert's `prompts` at that layer (BTX-style)."""

    kind: Literal["hidden"] = "hidden"


class CentroidRouterSpec(RowRouterSpec):
    """Each row from the mean token embedding of the expert's `prompts`."""

    kind: Literal["centroid"] = "centroid"


class ArrowRouterSpec(RowRouterSpec):
    """Each row from the top right singular vector of the expert's LoRA delta (Arrow)."""

    kind: Literal["arrow"] = "arrow"


class SmileRouterSpec(RowRouterSpec):
    """A token scores by its norm in the span of each expert delta's top `subspace` right singular vectors."""

    kind: Literal["smile"] = "smile"
    subspace: int = Field(4, ge=1)


class LearnedRouterSpec(TokenRouterSpec):
    """Rows read from `weights` (safetensors written by `mergeserve train-router`, relative to the spec)."""

    kind: Literal["learned"] = "learned"
    weights: str


class RandomRouterSpec(RowRouterSpec):
    """Random rows, seeded: the floor any other router must beat."""

    kind: Literal["random"] = "random"


class MixtureRouterSpec(Strict):
    family: ClassVar[str] = "mixture"
    kind: str
    top_k: int = Field(2, ge=1)
    # What the experts' attention becomes: `separate` runs each chosen expert's own attention (and
    # norms) and mixes the layer outputs; `merged` shares the merged attention and mixes only the
    # FFNs; `dynamic` merges every layer per request with the request's mixture (Twin-Merging; LoRA
    # experts, as a mix of their low-rank deltas).
    attention: Literal["separate", "merged", "dynamic"] = "separate"
    # Inverse temperature of the softmax over the experts' scores: larger is sharper.
    inverse_temperature: float = Field(1.0, gt=0)
    # Confidence-based selection (Dynamic-MoE): where the two best experts' weights in that softmax
    # over every expert differ by less than this, the router is unsure and the request mixes every
    # expert by that softmax instead of its top_k. 0: always top_k.
    min_margin: float = Field(0.0, ge=0, le=1)
    # Added to each expert's score before the softmax, by expert name (an expert not named: 0):
    # the prior a router's raw scores lack (one expert's perplexity is lower on every text).
    # Fitted with inverse_temperature by `mergeserve calibrate-router` on a labelled split.
    offsets: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        refuse_moved(data, {"scale": "router.inverse_temperature (mixture routers)"}, "router.")
        if isinstance(data, dict) and data.get("attention") in ("averaged", "routed"):
            raise ValueError(f"router.attention={data['attention']} does not apply to kind={data.get('kind')}: "
                             "mixture routers (perplexity, task_vector) take separate, merged, dynamic")
        return data

    @property
    def keeps_attention_deltas(self) -> bool:
        return self.attention == "dynamic"


class PerplexityRouterSpec(MixtureRouterSpec):
    """Each expert scored by how well its own model predicts the prompt."""

    kind: Literal["perplexity"] = "perplexity"
    # `inverse_perplexity`: 1/PPL, the paper's score. `log_likelihood`: log(1/PPL), the mean log-probability
    # per token, on which `offsets` are log-priors (softmax(t * (log p(x|e) + o_e)) is Bayes' rule) and
    # `mergeserve calibrate-router` fits a prior the 1/PPL scale cannot express.
    score: Literal["inverse_perplexity", "log_likelihood"] = "inverse_perplexity"


class TaskVectorRouterSpec(MixtureRouterSpec):
    """Each expert scored by cos(grad_base L(prompt), tau_i)."""

    kind: Literal["task_vector"] = "task_vector"


class RequestRouterSpec(Strict):
    family: ClassVar[str] = "request"
    kind: str
    # One model per request; above 1, the top k among the members sharing the request's tokenizer,
    # tokens drawn from their mixture.
    top_k: int = Field(1, ge=1)


class EncodedRouterSpec(RequestRouterSpec):
    # The member whose token embedding encodes every prompt (unset: the smallest).
    encoder: str | None = None


class RequestCentroidRouterSpec(EncodedRouterSpec):
    """The member whose experts' `prompts` lie nearest the request's mean embedding."""

    kind: Literal["centroid"] = "centroid"


class RequestPerplexityRouterSpec(RequestRouterSpec):
    """The member under which the request's text is likeliest (across tokenizers)."""

    kind: Literal["perplexity"] = "perplexity"


class KeywordsRouterSpec(RequestRouterSpec):
    """The member whose `keywords` the request contains."""

    kind: Literal["keywords"] = "keywords"


class RequestLearnedRouterSpec(EncodedRouterSpec):
    """A classifier on the prompt's mean embedding (`mergeserve train-router` on a route spec)."""

    kind: Literal["learned"] = "learned"
    weights: str


def _by_kind(models: tuple[type[Strict], ...], default: str) -> Any:
    return tagged_union({m.model_fields["kind"].default: m for m in models}, "kind", default, "router.kind")


# btx and mergeme: a token or a mixture router (hidden unless the section names another kind).
EXPERT_ROUTERS = (HiddenRouterSpec, CentroidRouterSpec, ArrowRouterSpec, SmileRouterSpec, LearnedRouterSpec, RandomRouterSpec, PerplexityRouterSpec,
                  TaskVectorRouterSpec)
ExpertRouter = _by_kind(EXPERT_ROUTERS, "hidden")
# method route: a request router (it has no default kind: each needs its own data).
REQUEST_ROUTERS = (RequestCentroidRouterSpec, RequestPerplexityRouterSpec, KeywordsRouterSpec, RequestLearnedRouterSpec)
REQUEST_KINDS = tuple(m.model_fields["kind"].default for m in REQUEST_ROUTERS)
ModelRouter = _by_kind(REQUEST_ROUTERS, "")
RouterSpec = Union[TokenRouterSpec, MixtureRouterSpec, RequestRouterSpec]
ROUTERS = (*EXPERT_ROUTERS, *REQUEST_ROUTERS)
