"""Planning: where the model goes and how the GPUs are used, decided from configs before any weight is read.

- `placement`: the device_map plan of one rank's components over its GPUs (pure), and what diffusers gets;
- `meta_sizes`: component sizes and layer splits computed on meta-device models (no weights read);
- `sharding`: the placement plan of a model folder for a SessionConfig, as the loader uses it;
- strategy = auto: `model_facts` (a model's cost-relevant facts from its configs), `hardware` (the GPUs),
  `costs` (the cost model, every constant with its source), `planner` (the pure `plan()`), `reasons` (its sentences), `layout` (the `Plan`
  and how it becomes SessionConfig arguments), `command` (`python -m dist_backend plan`, `generate --auto`),
  `table` (docs/PLANS.md).

Importing this package imports nothing heavy: torch, diffusers, transformers and accelerate are imported inside
the functions that need them, so the host can plan without paying for them.
"""
