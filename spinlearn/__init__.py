"""spinlearn: learn rotations for LLM quantization and fold them into the weights."""

__version__ = "0.1.0"


def rotate(model, layout="transformer_universal", *, mode=None, seed=0, verify=True):
    """Fold data-free R1/R2 rotations into ``model`` in place; returns (model, matrices). ``layout="auto"``
    infers the layout from the model. See rotation_plan.rotate."""
    from .rotation_plan import rotate as _rotate

    return _rotate(model, layout, mode=mode, seed=seed, verify=verify)


__all__ = ["rotate", "__version__"]
