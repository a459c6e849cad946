"""Per-layer probes: stacked heads trained for all layers (and models) at once."""
from layerprobe.probes.fit import ProbeError, control_labels, fit_probes, majority_baseline, resolve_layers
from layerprobe.probes.heads import StackedHeads
from layerprobe.probes.module import CachedFeatureData, ProbeModule

__all__ = ["ProbeError", "control_labels", "fit_probes", "majority_baseline", "resolve_layers", "StackedHeads",
           "CachedFeatureData", "ProbeModule"]
