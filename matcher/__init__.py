"""Dense detector-free image matching: LoFTR's coarse-to-fine pipeline with QuadTree attention."""

from .attention import full_attention, linear_attention, quadtree_attention
from .config import load_config
from .model import Matcher, config_to_dict

__all__ = ["Matcher", "load_config", "config_to_dict", "quadtree_attention", "linear_attention", "full_attention"]
__version__ = "0.1.0"
