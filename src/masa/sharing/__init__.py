"""Where attention is shared: atom dictionaries, shared linear layers and the ``share`` surgery."""

from masa.nn import AtomDictionary, CoefficientGenerator, SharedLinear
from masa.sharing.pca import matrix_pca, unexplained_energy
from masa.sharing.surgery import (
    MasaBank,
    ShareConfig,
    ShareReport,
    bank_of,
    collapse_generators,
    share,
    shared_layers,
)

__all__ = [
    "AtomDictionary",
    "CoefficientGenerator",
    "MasaBank",
    "ShareConfig",
    "ShareReport",
    "SharedLinear",
    "bank_of",
    "collapse_generators",
    "matrix_pca",
    "share",
    "shared_layers",
    "unexplained_energy",
]
