"""Deployable exports: compressed-tensors checkpoints (w4a16, w8a8, nvfp4, float) that vLLM serves.

``export_run`` (a run or model directory), ``export_model`` (an in-memory fused model), ``export_recipe_schemes``
(the end of a training run: ``output_dir/export-SCHEME/``), ``load_export`` (an export back as a float model with
its online transforms applied, for ``spinlearn eval``). See ``api.py`` for the steps.
"""

from .api import export_model, export_recipe_schemes, export_run, serving_notes
from .loading import is_export, load_export
from .schemes import ExportScheme, resolve_scheme

__all__ = ["export_model", "export_recipe_schemes", "export_run", "serving_notes", "is_export", "load_export",
           "ExportScheme", "resolve_scheme"]
