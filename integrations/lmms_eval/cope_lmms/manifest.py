"""The `lmms_eval.models` entry point: lmms-eval calls `manifest()` and registers what it returns.

It must be a ModelManifest (or a function giving one), never the model class: lmms-eval calls a
callable payload with no arguments and drops every entry point after one that fails.
"""


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest  # lazy: importing this package needs no lmms-eval

    return ModelManifest(model_id="cope_jax", simple_class_path="cope_lmms.model.CopeJax")
