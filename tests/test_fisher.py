"""The diagonal Fisher of `mergeserve fisher` against one computed by hand on a tiny model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from mergeserve.experts import ExpertPool
from mergeserve.learn.fisher import diagonal_fisher

CHECKED = ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight")


def fisher_by_hand(model: torch.nn.Module, tokens: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """What fisher.py's docstring defines: the mean over sequences of the squared gradient of each
    sequence's log-likelihood, sum_t log p(x_t | x_<t), one autograd pass per sequence."""
    params = dict(model.named_parameters())
    for n in names:
        params[n].requires_grad_(True)  # peft leaves a merged model's weights frozen
    out = {n: torch.zeros_like(params[n]) for n in names}
    for row in tokens:
        logprobs = torch.log_softmax(model(input_ids=row.unsqueeze(0)).logits[0, :-1], dim=-1)  # [T - 1, V]
        loglik = logprobs.gather(1, row[1:].unsqueeze(1)).sum()
        for n, g in zip(names, torch.autograd.grad(loglik, [params[n] for n in names])):
            out[n] += g.pow(2) / len(tokens)
    return out


@pytest.mark.parametrize("expert", ["math", "lora-math"])  # a dense fine-tune, a LoRA adapter (read merged)
def test_the_diagonal_fisher_is_the_mean_squared_gradient_of_each_sequence_loglik(zoo, adapters, expert: str):
    pool = ExpertPool()
    if expert == "math":
        checkpoint = pool.get(str(zoo["math"]))
        model = AutoModelForCausalLM.from_pretrained(zoo["math"], dtype=torch.float32)
    else:
        from peft import PeftModel

        checkpoint = pool.get_expert(str(adapters["math"]), str(zoo["base"]))
        base = AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapters["math"]).merge_and_unload()
    tokens = torch.randint(3, checkpoint.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    fisher = diagonal_fisher(checkpoint, tokens)
    n_layers = checkpoint.config.num_hidden_layers
    assert {n for n in fisher if n.startswith("model.layers.")} == set(fisher) and len(fisher) == 7 * n_layers
    expected = fisher_by_hand(model.eval(), tokens, CHECKED)
    for name in CHECKED:
        assert expected[name].abs().max() > 0
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-5, atol=1e-5 * expected[name].abs().max().item())
