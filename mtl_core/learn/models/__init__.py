"""Multi-task architectures over one shared input encoder: shared-bottom, MMoE, PLE; ESMM chaining."""

from mtl_core.learn.models.multitask import MultiTaskModel, build_model

__all__ = ["MultiTaskModel", "build_model"]
