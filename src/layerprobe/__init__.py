"""layerprobe: where inside a language model does instruction tuning make representations task-specific?"""

__version__ = "0.1.0"
