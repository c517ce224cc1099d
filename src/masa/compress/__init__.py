"""Training-free compression: calibrate, then replace target layers by smaller ones (``masa compress``).

Importing this package registers every method: ``svd``, ``asvd``, ``svd-llm`` (``methods``) and
``masa`` (``masa_method``).
"""

from masa.compress import (  # noqa: F401 (allocation option, more methods)
    allocation,
    basis_sharing,
    cospadi,
    fwsvd,
    masa_method,  # noqa: F401 (registers the "masa" method)
)
from masa.compress.calibration import CalibrationStats, calibrate, load_stats, save_stats
from masa.compress.config import CompressConfig
from masa.compress.methods import (
    MethodFn,
    available_methods,
    get_method,
    register_method,
    replace_with_lowrank,
)
from masa.compress.pipeline import CompressResult, compress

__all__ = [
    "CalibrationStats",
    "CompressConfig",
    "CompressResult",
    "MethodFn",
    "available_methods",
    "calibrate",
    "compress",
    "get_method",
    "load_stats",
    "register_method",
    "replace_with_lowrank",
    "save_stats",
]
