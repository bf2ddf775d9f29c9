"""What the nodes share: socket type names, the pipeline handle, and ComfyUI hooks resolved at call time."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

CATEGORY = "DistDiff"
PIPELINE = "DISTDIFF_PIPELINE"
CONDITIONING = "DISTDIFF_CONDITIONING"
MODEL_FOLDER = "diffusers"  # ComfyUI's models/diffusers; registered by us when a ComfyUI version lacks it


@dataclass(frozen=True)
class PipelineHandle:
    """What flows on a DISTDIFF_PIPELINE socket: no tensors, no processes, just what identifies the sidecar.
    Downstream nodes ask the engine for the live session of `config` (restarting it if it died), so a cached
    handle can never point at a dead or replaced sidecar."""

    config: object  # dist_backend.config.SessionConfig
    model_dir: str  # a diffusers folder; for single files, the ModelFiles' key (a name, not a path)
    family: str
    loras: tuple[tuple[str, float], ...] = ()
    """(file, strength) in chain order (DistDiffLoRA nodes append); the ranks hold exactly these for every stage."""
    files: object = None  # dist_backend.files.ModelFiles when the model was loaded from single files
    plan: object = field(default=None, compare=False)
    """dist_backend.planning.auto.LoaderPlan: how the loader chose the layout; ParallelDenoise checks each request
    against it."""
    cluster: object = None  # dist_backend.cluster.ClusterConfig when ranks on other machines join; None: this one

    def session(self):
        from ..dist_backend.session import get_session

        session = get_session(self.config, cluster=self.cluster)
        if self.plan is not None and session.status.snapshot.plan is None:
            session.status.set_plan(self.plan.summary())  # a sidecar started again for this handle
        session.load(self.files if self.files is not None else self.model_dir)  # no-op when already loaded
        session.set_loras(self.loras)  # no-op when the ranks already hold exactly this set
        return session


PLAN_OUTPUT = ("STRING", "plan")
"""The loaders' second output: the plan as text (its layout, reasons and warnings); wire it to any text display."""


def model_folders() -> list[str]:
    import folder_paths

    if MODEL_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))
    return list(folder_paths.get_folder_paths(MODEL_FOLDER))


def list_models() -> list[str]:
    """Sub-folders of every models/diffusers path that hold a diffusers pipeline (model_index.json)."""
    names = set()
    for root in model_folders():
        if os.path.isdir(root):
            for entry in os.listdir(root):
                if os.path.isfile(os.path.join(root, entry, "model_index.json")):
                    names.add(entry)
    return sorted(names)


def resolve_model(name: str, path: str) -> str:
    """An absolute `path` wins; otherwise `name` inside one of the models/diffusers folders."""
    from ..dist_backend.errors import ModelError

    if path.strip():
        return os.path.abspath(os.path.expanduser(path.strip()))
    for root in model_folders():
        candidate = os.path.join(root, name)
        if os.path.isdir(candidate):
            return candidate
    raise ModelError(f"model {name!r} is not in any models/{MODEL_FOLDER} folder ({', '.join(model_folders())}); "
                     "put the diffusers folder there or give its absolute path in model_path")


def folder_fingerprint(model_dir: str) -> str:
    """Names, sizes and modification times of a diffusers folder's files (top level and one level down: the
    component folders), so replacing a weights file changes it. Stats only: cheap enough for every queue."""
    entries = []
    for root, dirs, files in os.walk(model_dir, followlinks=True):
        depth = os.path.relpath(root, model_dir).count(os.sep) + (root != model_dir)
        if depth >= 1:
            dirs.clear()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            entries.append(f"{os.path.relpath(os.path.join(root, name), model_dir)}:{st.st_size}:{st.st_mtime_ns}")
    return f"{os.path.realpath(model_dir)}|" + "|".join(sorted(entries))


def files_fingerprint(paths: list[str]) -> str:
    """Like folder_fingerprint, for single model files: path, size and modification time of each."""
    entries = []
    for path in paths:
        st = os.stat(path)
        entries.append(f"{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(entries)


def lora_names() -> list[str]:
    """LoRA files in ComfyUI's models/loras folders (ComfyUI's own list, as its LoraLoader shows it)."""
    import folder_paths

    return [n for n in folder_paths.get_filename_list("loras") if n.lower().endswith(".safetensors")]


def resolve_lora(name: str) -> str:
    import folder_paths

    from ..dist_backend.errors import ModelError

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras"))
        raise ModelError(f"LoRA {name!r} is not in any models/loras folder ({folders}); put the file there")
    return path


def comfy_should_cancel():
    import comfy.model_management

    return comfy.model_management.processing_interrupted


def run_cancellable(fn):
    """Run an engine call; turn our Cancelled into ComfyUI's own interrupt so the queue goes on normally."""
    from ..dist_backend.errors import Cancelled

    try:
        return fn()
    except Cancelled:
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        raise
