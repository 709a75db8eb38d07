"""What is learned or calibrated from data, above the engine: it runs compositions through the
engine's own forward, so what it learns is what is served.

- `compose`: the builder (merge, then routers; hidden and centroid rows calibrated by
  `router_inputs` on the experts' prompts);
- `tune`: merge coefficients (`mergeserve tune-merge`); `fisher`: diagonal Fishers
  (`mergeserve fisher`); `shrink`: alike experts merged into fewer (`mergeserve shrink`);
- `token_router`: an MoE's router rows, `request_router`: a route spec's request classifier
  (`mergeserve train-router`).
"""
