"""mergeserve's models inside vLLM: the `vllm.general_plugins` entry point registers them.

vLLM calls `register()` in each of its processes at start (install mergeserve into vLLM's
environment: `pip install --no-deps mergeserve`; `make vllm` does). The model itself
(`model.py`) imports vLLM and is imported by vLLM only when a checkpoint names its
architecture; this module and `lora_moe.py` import without vLLM.
"""

from __future__ import annotations

ARCHITECTURE = "MergeserveLoraMoeForCausalLM"  # config.json's `architectures` of export/lora_moe.py


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "mergeserve.vllm_plugin.model:LoraMoeForCausalLM")
