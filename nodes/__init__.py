"""ComfyUI glue only: one node per file. The engine lives in dist_backend."""
