"""Per-layer probes: stacked heads trained for all layers (and models) at once."""
from layerprobe.probes.controls import content_words, control_labels, control_types, mdl_block_ends, online_codelength
from layerprobe.probes.fit import (ProbeError, fit_probes, majority_baseline, mdl_order, resolve_layers,
                                   task_control_labels)
from layerprobe.probes.heads import StackedHeads
from layerprobe.probes.module import CachedFeatureData, ProbeModule
from layerprobe.probes.solver import fit_softmax_heads

__all__ = ["ProbeError", "content_words", "control_labels", "control_types", "fit_probes", "fit_softmax_heads",
           "majority_baseline", "mdl_block_ends", "mdl_order", "online_codelength", "resolve_layers",
           "task_control_labels", "StackedHeads", "CachedFeatureData", "ProbeModule"]
