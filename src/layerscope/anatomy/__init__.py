"""Anatomy: which tensor is a query, a key, an MLP projection, in which layer, and the model's dims."""

from .core import (ROLES, Anatomy, Dims, Part, TensorEntry, build_anatomy, classify, detect_family, dims_from_config,
                   expert_of, layer_of, shape_text)

__all__ = ["ROLES", "Anatomy", "Dims", "Part", "TensorEntry", "build_anatomy", "classify", "detect_family",
           "dims_from_config", "expert_of", "layer_of", "shape_text"]
