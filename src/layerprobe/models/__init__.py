"""Models: loading checkpoints, capturing every layer, roles, and prompt rendering.

    load.py       checkpoint identity, memory estimate, frozen backbone + tokenizer
    capture.py    the architecture table and one-pass capture of layers 0..L
    prompting.py  prompts -> token ids (plain or chat template) and the tokens read
    roles.py      per-role settings checked before loading (dtype, placement)

Import order runs one way (load <- capture, prompting <- roles), so there is no circle;
the tuning stage (layerprobe.tuning) uses the same loading and prompting code.
"""
from layerprobe.models.capture import BLOCK_PATHS, FINAL_NORM_PATHS, LayerCapture, find_blocks, find_final_norm, pool
from layerprobe.models.load import (DTYPES, BackboneError, check_checkpoint, checkpoint_identity, count_parameters,
                                    ensure_pad_token, is_local, load_backbone, log_memory_estimate, memory_estimate,
                                    quiet_transformers)
from layerprobe.models.prompting import (POSITION_RULE, Encoded, PromptEncoder, PromptError, PromptSpec, load_tokenizer,
                                         make_spec, prepare_prompts, render_chat, render_plain)
from layerprobe.models.roles import PlacementError, check_placement, extract_settings_for

__all__ = [
    "BLOCK_PATHS", "FINAL_NORM_PATHS", "LayerCapture", "find_blocks", "find_final_norm", "pool",
    "DTYPES", "BackboneError", "check_checkpoint", "checkpoint_identity", "count_parameters", "ensure_pad_token", "is_local",
    "load_backbone", "log_memory_estimate", "memory_estimate", "quiet_transformers",
    "POSITION_RULE", "Encoded", "PromptEncoder", "PromptError", "PromptSpec", "load_tokenizer", "make_spec", "prepare_prompts",
    "render_chat", "render_plain",
    "PlacementError", "check_placement", "extract_settings_for",
]
