"""Every layer masa puts into a model, in one place: shared atoms, low-rank, shared bases, sparse codes, split fused projections."""

from masa.nn.basis import BasisLinear, SharedBasis, SparseCodeLinear, index_dtype
from masa.nn.fused import SplitLinear
from masa.nn.lowrank import LowRankLinear
from masa.nn.protocol import KINDS, RUNTIMES, MasaLinear, parameter_kinds
from masa.nn.runtime import check_runtime, masa_layers, resident_bytes, runtime_of, set_runtime
from masa.nn.shared import AtomDictionary, CoefficientGenerator, RefinedSharedLinear, SharedLinear

__all__ = [
    "KINDS",
    "RUNTIMES",
    "check_runtime",
    "masa_layers",
    "resident_bytes",
    "runtime_of",
    "set_runtime",
    "MasaLinear",
    "parameter_kinds",
    "AtomDictionary",
    "BasisLinear",
    "CoefficientGenerator",
    "LowRankLinear",
    "RefinedSharedLinear",
    "SharedBasis",
    "SharedLinear",
    "SparseCodeLinear",
    "SplitLinear",
    "index_dtype",
]
