"""Composition specs and serve configs: pydantic models validated once, at the edge.

A composition spec says which experts, which merge method for the shared layers and which router
(spec/composition.py, with spec/merge.py and spec/router.py: one model per method and per router
kind); spec/transport.py says how a composition served elsewhere is reached; a serve config
(spec/serve.py) says which compositions to serve and how. `mergeserve spec-schema [--serve]` prints the
JSON Schema of a composition spec (of a serve config), for editors; spec/reference.py renders them as
the reference pages under docs/reference/.
"""

from mergeserve.spec.base import NAME_PATTERN, SpecError
from mergeserve.spec.composition import MOE_METHODS, MOVED, CompositionSpec, ExpertSpec, Method
from mergeserve.spec.load import (load_composition, load_serve_config, package_folder, parse_composition,
                                      resolve_source, upgrade_saved)
from mergeserve.spec.merge import (MODELS as MERGE_MODELS, ConsensusMerge, DareLinearMerge, DareTiesMerge, FisherMerge, LinearMerge,
                                       MergeOverride, SlerpMerge, TaskArithmeticMerge, TaskVectorMerge, TiesMerge,
                                       merge_params)
from mergeserve.spec.router import (MixtureRouterSpec, RequestRouterSpec, RouterSpec, TokenRouterSpec)
from mergeserve.spec.serve import MAX_TARGETS, AliasSpec, EngineConfig, RolloutGuards, RolloutPolicy, ServeConfig
from mergeserve.spec.transport import GATEWAY_FLAGS, BackendKind, Upstream, VLLMLoRA, VLLMOptions, VLLMProfile, plain_url


def composition_schema() -> dict:
    """The JSON Schema of a composition spec file (`mergeserve spec-schema`). Looser than the
    models where a field's allowed form depends on another's (a router's family on the method)."""
    schema = CompositionSpec.model_json_schema(by_alias=True)
    _experts_may_be_a_file(schema)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def serve_schema() -> dict:
    """The JSON Schema of a serve config file (`mergeserve spec-schema --serve`): its compositions
    are specs written inline or the paths of spec files."""
    schema = ServeConfig.model_json_schema(by_alias=True)
    _experts_may_be_a_file(schema["$defs"]["CompositionSpec"])
    compositions = schema["properties"]["compositions"]
    compositions["items"] = {"anyOf": [compositions["items"], {"type": "string", "description": "a spec file, relative to this config"}]}
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _experts_may_be_a_file(spec: dict) -> None:
    """A spec's `experts` is the list, or a YAML file holding it (spec/load.py)."""
    experts = spec["properties"]["experts"]
    outer = {k: experts.pop(k) for k in ("title", "default", "description") if k in experts}
    spec["properties"]["experts"] = {"anyOf": [experts, {"type": "string", "description": "a YAML file holding the list"}], **outer}
