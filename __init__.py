"""DistDiff ComfyUI node pack. Importing this module starts nothing: the node classes are imported the first time
ComfyUI reads NODE_CLASS_MAPPINGS, and rank processes start on the first run of a LoadSharded node."""

WEB_DIRECTORY = "./web"


def __getattr__(name):
    if name in ("NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"):
        from .nodes import registry

        return getattr(registry, name)()
    raise AttributeError(name)


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
