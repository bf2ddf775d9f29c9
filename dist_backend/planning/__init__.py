"""Planning: where the model goes and how the GPUs are used, decided from configs before any weight is read.

- `placement`: the device_map plan of one rank's components over its GPUs (pure), and what diffusers gets;
- `meta_sizes`: component sizes and layer splits computed on meta-device models (no weights read);
- `sharding`: the placement plan of a model folder for a SessionConfig, as the loader uses it.

Importing this package imports nothing heavy: torch, diffusers, transformers and accelerate are imported inside
the functions that need them, so the host can plan without paying for them.
"""
