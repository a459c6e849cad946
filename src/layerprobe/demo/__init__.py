"""The offline demo model pair (tiny Llama base + its instruction-tuned version)."""
from layerprobe.demo.models import build_demo_pair

__all__ = ["build_demo_pair"]
