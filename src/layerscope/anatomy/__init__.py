"""Anatomy: which tensor is a query, a key, an MLP projection, in which stack and layer, and the model's dims.

core.py builds an :class:`Anatomy`; skeleton.py reads transformers' module tree (meta device);
names.py holds the name tables; dims.py the dims; fused.py the fused q|k|v layouts.
"""

from .core import (ROLES, Anatomy, AttentionSpec, Dims, Part, TensorEntry, build_anatomy, classify, detect_family,
                   dims_from_config, expert_of, layer_of, shape_text)
from .names import ATTENTION_ROLES, CROSS_ROLES, stack_of

__all__ = ["ROLES", "ATTENTION_ROLES", "CROSS_ROLES", "Anatomy", "AttentionSpec", "Dims", "Part", "TensorEntry",
           "build_anatomy", "classify", "detect_family", "dims_from_config", "expert_of", "layer_of", "shape_text",
           "stack_of"]
