"""Transformer forward with MoE FFN, KV cache, continuous-batching scheduler, sampler."""
