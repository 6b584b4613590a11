"""Compression route: depth pruning by angular distance / Block Influence, layer surgery, self-data
distillation with conditional selection, SLERP merging and the speculative-decoding check (methods.md §2).

Index convention everywhere: layers are 0-based and a block `start:end` is end-exclusive.
"""

from stillroom.prune.angular import LayerAnalysis, analyze_layers, angular_distances, load_calibration_texts
from stillroom.prune.merge import MergeShapeError, slerp, slerp_model_folders, slerp_state_dicts
from stillroom.prune.selfdistill import run_selfdistill, select_rewrite, self_distill
from stillroom.prune.specdec import SpecDecStats, assisted_generate, measure_speculative
from stillroom.prune.surgery import drop_layers, parse_block, prune_model_folder

__all__ = [
    "LayerAnalysis",
    "MergeShapeError",
    "SpecDecStats",
    "analyze_layers",
    "angular_distances",
    "assisted_generate",
    "drop_layers",
    "load_calibration_texts",
    "measure_speculative",
    "parse_block",
    "prune_model_folder",
    "run_selfdistill",
    "select_rewrite",
    "self_distill",
    "slerp",
    "slerp_model_folders",
    "slerp_state_dicts",
]
