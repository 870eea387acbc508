"""The built-in miniature world: procedural scenes, a tiny Stable Diffusion trained on them, and tools.

- ``loraclr.world.scenes``: identities, scenes, rendering with captions and boxes, samplers, held-out
  concept identities (``CONCEPTS``) and styles.
- ``loraclr.world.model``: the mini SD's configs and pipeline folder; ``base_model_path()`` and
  ``load_base_pipeline()`` give the built-in base model.
- ``loraclr.world.training``: how the base model is trained (``scripts/train_world.py``).
- ``loraclr.world.evaluator_training``: how the world's evaluators are trained and calibrated
  (``scripts/train_evaluators.py``).
"""

__all__ = ["base_model_path", "load_base_pipeline"]


def __getattr__(name):
    # lazy, so that ``loraclr.world.scenes`` stays numpy / PIL only
    if name in __all__:
        from loraclr.world import model

        return getattr(model, name)
    raise AttributeError(f"module 'loraclr.world' has no attribute {name!r}")
