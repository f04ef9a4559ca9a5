"""EMCA-Train: EMCA-ResNets (Efficient Multi-scale Channel Attention) and their training framework.

    model, transform = emca.load_model("run/checkpoints/best.pt")   # emca/api.py
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str):
    # Lazily, so that `import emca` (and the light tools under it, such as the launcher) imports no torch.
    if name == "load_model":
        from emca.api import load_model

        return load_model
    raise AttributeError(f"module 'emca' has no attribute '{name}'")
