"""Analyses of the weights alone: the metrics registry, spectra, attention-head circuits, MLP spectra,
embedding geometry and token clusters."""
