"""`method: route`: whole models behind one name, each request routed at admission to one of them.

Every member is an ordinary local backend (its own engine and KV cache) on the shared executor,
which steps the engines in turn: requests for the same member batch together in its forward.
The routing decision is made on the request's text, before any tokenization, because members
may have different tokenizers; the chosen member then applies its own chat template.

With router.top_k > 1 a request goes to its best member and up to k - 1 runners-up that share its
tokenizer: every one of them runs it in its own engine, and each token is drawn from their
distributions mixed with weights softmax(router scores) (engine/mixing.py). Members with another
tokenizer are never mixed in.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from pydantic import BaseModel

from mergeserve.router.request import RequestRouter, tokenizer_key, top_members
from mergeserve.engine.coordinator import Mixture
from mergeserve.server.backends.base import Call
from mergeserve.server.backends.local import LocalBackend
from mergeserve.server.errors import bad_request
from mergeserve.server.protocol import ChatCompletionRequest, CompletionRequest


class RouteBackend:
    kind = "local"
    engine = None  # no single engine: each member has its own (router statistics are per member)

    def __init__(
        self, name: str, members: dict[str, LocalBackend], router: RequestRouter, router_kind: str, top_k: int = 1,
        method: str = "route",
    ) -> None:
        self.name, self.members, self.router_kind, self.top_k, self.method = name, members, router_kind, top_k, method
        self._batcher = BatchedRouter(router)
        # Members whose tokenizers have the same vocabulary (token ids mean the same text) can be mixed.
        self._vocab = [tokenizer_key(m.engine.tokenizer) for m in members.values()] if top_k > 1 else [0] * len(members)

    @property
    def num_running(self) -> int:
        return sum(m.num_running for m in self.members.values())

    @property
    def num_waiting(self) -> int:
        return sum(m.num_waiting for m in self.members.values())

    @property
    def max_waiting(self) -> int:
        return sum(m.max_waiting for m in self.members.values())

    @property
    def kv_cache_bytes(self) -> int | None:
        return sum(m.kv_cache_bytes or 0 for m in self.members.values())

    @property
    def engines(self) -> list:
        return [m.engine for m in self.members.values()]

    def describe(self) -> dict[str, Any]:
        return {"kind": self.method, "router": self.router_kind, "top_k": self.top_k, "members": {
            n: {"architecture": m.engine.composed.config.model_type, "kv_cache_bytes": m.kv_cache_bytes}
            for n, m in self.members.items()}}

    def close(self, wait: bool = False) -> None:
        for member in self.members.values():
            member.close(wait)

    async def completions(self, body: CompletionRequest, call: Call) -> BaseModel:
        prompt = body.prompt
        if not isinstance(prompt, str) and not all(isinstance(p, str) for p in prompt):
            raise bad_request("a routed composition's members have their own tokenizers: send the prompt as text, "
                              "not token ids", param="prompt")
        member = await self._choose("\n".join([prompt] if isinstance(prompt, str) else prompt), body, call)
        return await member.completions(_unrouted(body), call)

    async def chat_completions(self, body: ChatCompletionRequest, call: Call) -> BaseModel:
        text = "\n".join(m["content"] for m in body.template_messages() if m["role"] != "assistant")
        member = await self._choose(text, body, call)
        return await member.chat_completions(_unrouted(body), call)

    async def _choose(self, text: str, body: CompletionRequest | ChatCompletionRequest, call: Call) -> LocalBackend:
        """What serves this request: the best member by the router's scores (shifted by `expert_bias`,
        outside `experts` masked), mixed with its runners-up of the same tokenizer when top_k > 1."""
        names = list(self.members)
        scores = await self._batcher.scores(text)  # [M]
        if (bias := body.router_bias(names)) is not None:
            scores = scores + torch.tensor(bias)
        chosen = top_members(scores, self.top_k, self._vocab)
        lead = names[chosen[0]]
        call.lease.member = "+".join(names[i] for i in chosen)
        for i in chosen:
            call.metrics.member_requests.labels(self.name, names[i]).inc()
        if len(chosen) == 1:
            return self.members[lead]
        member = self.members[lead]
        mix = Mixture(tuple(self.members[names[i]].engine for i in chosen[1:]), tuple(float(scores[i]) for i in chosen))
        return LocalBackend(member.engine, member.executor, mix)


def _unrouted(body: BaseModel) -> BaseModel:
    """The request as its member serves it: the member is dense, the routing fields were used here."""
    return body.model_copy(update={"experts": None, "expert_bias": None})


class BatchedRouter:
    """Routes every text that arrives while a routing forward runs together in the next one:
    one batched forward per member for all new prompts. Lives on the event loop (no locks)."""

    def __init__(self, router: RequestRouter) -> None:
        self.router = router
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.running = False

    async def scores(self, text: str) -> torch.Tensor:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((text, future))
        if not self.running:
            self.running = True
            asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    scores = await asyncio.to_thread(self.router.scores, [t for t, _ in batch])  # [N, M]
                except Exception as e:  # noqa: BLE001 (each waiting request gets the failure)
                    for _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, f), row in zip(batch, scores):
                    if not f.done():
                        f.set_result(row)
        finally:
            self.running = False
