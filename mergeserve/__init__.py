"""mergeserve: compose expert LLM checkpoints into a Mixture-of-Experts in memory and serve it."""

__version__ = "0.1.0"
