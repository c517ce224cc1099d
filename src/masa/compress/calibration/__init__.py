"""Calibration: statistics of the targeted layers' inputs (Gram matrices, channel scales, logit-lens
drift, Fisher information), gathered block by block, and their cache on disk."""

from masa.compress.calibration.cache import cached_calibrate, calibration_cache_key, load_stats, save_stats
from masa.compress.calibration.collect import CalibrationStats, calibrate
from masa.compress.calibration.fisher import fisher_information, with_fisher

__all__ = [
    "CalibrationStats",
    "cached_calibrate",
    "calibrate",
    "calibration_cache_key",
    "fisher_information",
    "with_fisher",
    "load_stats",
    "save_stats",
]
