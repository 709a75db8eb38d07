"""Mean per-token loss of a causal LM on held-out examples (each scored on its own, truncated)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mergeserve.zoo.splits import Example


@torch.no_grad()
def heldout_loss(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                 max_tokens: int = 256, batch_size: int = 8) -> float:
    """Summed token losses over summed predicted tokens: every token after an example's first."""
    was_training = model.training
    model.eval()
    ids = [tokenizer(e["text"], add_special_tokens=False).input_ids[:max_tokens] for e in examples]
    ids.sort(key=len)  # similar lengths per batch: less padding
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch = ids[start:start + batch_size]
        width = max(map(len, batch))
        x = torch.zeros(len(batch), width, dtype=torch.long)  # [B, T]
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, seq in enumerate(batch):
            x[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()  # [B, T-1, V]
        targets = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / count
