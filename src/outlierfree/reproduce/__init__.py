"""``outlierfree reproduce``: train vanilla, clipped and gated models, measure outliers, quantize, write the table.

    from outlierfree.reproduce import ReproduceRequest, reproduce
    reproduce(ReproduceRequest("quick", "runs/quick")).write("runs/quick")
"""

from .presets import PAPER, PRESETS, Preset, RunSpec, get_preset
from .run import ReproduceRequest, ReproduceResult, reproduce

__all__ = ["reproduce", "ReproduceRequest", "ReproduceResult", "PRESETS", "PAPER", "Preset", "RunSpec", "get_preset"]
