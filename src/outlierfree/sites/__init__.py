"""Named tensor sites shared by outlier analysis and the quantization simulator (see :mod:`.observe` and :mod:`.opmode`)."""

from .observe import (ATTENTION_POINTS, Observed, discover, in_head, layer_index, norm_modules, observe, parse_kinds,
                      select)
from .site import SITE_KINDS, Site
from .opmode import RESIDUAL_KIND, grid_of, mark

__all__ = ["Site", "SITE_KINDS", "ATTENTION_POINTS", "RESIDUAL_KIND", "Observed", "discover", "observe", "select",
           "layer_index", "norm_modules", "parse_kinds", "in_head", "grid_of", "mark"]
