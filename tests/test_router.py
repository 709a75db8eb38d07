"""Training-free `hidden` router: each expert's own domain goes to that expert."""

from __future__ import annotations

import torch

from mergeserve.engine.model import Batch, Transformer
from mergeserve.experts import ExpertPool
from mergeserve.merge import build
from mergeserve.spec import parse_composition

DOMAINS = {
    "code": ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n"],
    "german": ["Der Hund läuft schnell über die Straße.", "Die Katze schläft im Haus."],
    "math": ["What is 12 + 7? 12 + 7 = 19.", "Tom has 5 apples and buys 3 more, so he has 8."],
}


def test_hidden_router_sends_each_domain_to_its_expert(zoo):
    spec = parse_composition({
        "name": "hidden", "base": str(zoo["base"]), "router": {"kind": "hidden", "top_k": 1},
        "experts": [{"name": n, "source": str(zoo[n]), "prompts": p} for n, p in DOMAINS.items()],
    })
    composed = build(spec, ExpertPool())
    model = Transformer(composed, max_len=128)
    for expert, prompts in enumerate(DOMAINS.values()):
        for prompt in prompts:
            ids = composed.tokenizer(prompt)["input_ids"]
            model.expert_load.zero_()
            model(Batch(torch.tensor([ids]), torch.arange(len(ids)).unsqueeze(0), None))
            load = model.expert_load  # [layers, experts], top-1 routing
            # The majority of the prompt's tokens pick its own expert, in every layer.
            assert (load.argmax(dim=1) == expert).all(), (prompt, load)


def test_random_router_is_seeded(zoo):
    def rows(seed):
        spec = parse_composition({
            "name": "r", "base": str(zoo["base"]), "router": {"kind": "random", "seed": seed},
            "experts": [{"name": n, "source": str(zoo[n])} for n in DOMAINS],
        })
        return build(spec, ExpertPool()).layers[0].router
    assert torch.equal(rows(1), rows(1)) and not torch.equal(rows(1), rows(2))
