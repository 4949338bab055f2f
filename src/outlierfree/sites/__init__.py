"""Named tensor sites shared by outlier analysis and the quantization simulator (see :mod:`.core`)."""

from .core import ATTENTION_POINTS, SITE_KINDS, Site, discover, layer_index, observe, select

__all__ = ["Site", "SITE_KINDS", "ATTENTION_POINTS", "discover", "observe", "select", "layer_index"]
