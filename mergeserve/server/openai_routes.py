"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /v1/feedback.

A request is validated, admitted (a lease on the composition's live revision, through
an alias if it names one) and handed to that revision's backend (server/backends/).
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel

from mergeserve.server import errors, limits
from mergeserve.server.backends.base import Call
from mergeserve.server.metrics import Metrics
from mergeserve.server.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse, FeedbackRequest,
    FeedbackResponse, ModelCard, ModelList,
)
from mergeserve.server.registry import Lease, Registry


class OpenAIRoutes:
    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry, self.metrics = registry, metrics
        self.created = int(time.time())
        # 401: only when API keys are configured.
        self.router = APIRouter(prefix="/v1", responses=errors.responses(401))
        self.router.add_api_route("/models", self.models, methods=["GET"])
        # response_model=None: these return either a model or a stream; `responses` documents both.
        self.router.add_api_route(
            "/completions", self.completions, methods=["POST"], response_model=None,
            responses={200: _json_or_stream(CompletionResponse), **errors.responses(404, 429, 503)},
        )
        self.router.add_api_route(
            "/chat/completions", self.chat_completions, methods=["POST"], response_model=None,
            responses={200: _json_or_stream(ChatCompletionResponse), **errors.responses(404, 422, 429, 503)},
        )
        self.router.add_api_route("/feedback", self.feedback, methods=["POST"], responses=errors.responses(404, 409))

    async def models(self) -> ModelList:
        cards = [self._card(name) for name in self.registry.names()]
        cards += [ModelCard(id=n, created=self.created, targets=a.targets) for n, a in self.registry.aliases().items()]
        return ModelList(data=cards)

    def _card(self, name: str) -> ModelCard:
        live, _ = self.registry.revision(name)
        spec = live.spec if live is not None else None
        if spec is None or spec.base is None or not spec.experts:
            return ModelCard(id=name, created=self.created)
        root = spec.experts[0].source if len(spec.experts) == 1 else spec.base
        return ModelCard(id=name, created=self.created, root=root, parent=spec.base if root != spec.base else None)

    async def feedback(self, body: FeedbackRequest, request: Request) -> FeedbackResponse:
        """One score per response: 404 for an id not (or no longer) remembered, 409 for a second score."""
        answered = self.registry.score(body.id)
        request.state.model = answered.name
        self.metrics.feedback.labels(answered.name).observe(body.score)
        self.metrics.feedback_by_expert.labels(answered.name, answered.top_expert).observe(body.score)
        if answered.alias is not None:
            self.metrics.tallies.feedback(answered.alias, answered.generation, answered.name, body.score)
        return FeedbackResponse(id=body.id, model=answered.name, revision=answered.revision, experts=answered.experts)

    async def completions(self, body: CompletionRequest, request: Request, response: Response) -> BaseModel | Response:
        with self._call(body, request, response) as call:
            return await call.lease.backend.completions(body, call)

    async def chat_completions(
        self, body: ChatCompletionRequest, request: Request, response: Response,
    ) -> BaseModel | Response:
        with self._call(body, request, response) as call:
            return await call.lease.backend.chat_completions(body, call)

    def _call(self, body: CompletionRequest | ChatCompletionRequest, request: Request, response: Response) -> Call:
        return Call(request, response, self._admit(body, request), self.metrics, self.registry)

    def _admit(self, body: CompletionRequest | ChatCompletionRequest, request: Request) -> Lease:
        # Sticky A/B assignment: a session header wins over the OpenAI `user` field.
        sticky = request.headers.get("x-session-id") or body.user
        param = "n" if (body.n or 1) > 1 else "prompt"  # what makes the request too big for any queue
        lease = limits.admit(self.registry, body.model, sticky, body.num_sequences, param)
        request.state.model = lease.name
        if lease.alias is not None:
            self.metrics.alias_requests.labels(lease.alias, lease.name).inc()
        return lease


def _json_or_stream(model: type[BaseModel]) -> dict:
    """OpenAPI for a 200 that is `model` as JSON, or with stream=true server-sent events of
    JSON chunks (or an in-band error) ending with `[DONE]`."""
    event = {"type": "string", "contentMediaType": "application/json"}
    return {"model": model, "content": {"text/event-stream": {"schema": {
        "type": "object", "required": ["data"],
        "properties": {"data": {"anyOf": [{"const": "[DONE]"}, event]}},
    }}}}
