"""masa: Matrix Atom Sharing — smaller transformers by sharing weights across their layers.

Where things live: ``masa.sharing`` (atom dictionaries and the ``share`` surgery), ``masa.model``
(the native decoder LM and its attention variants), ``masa.train`` (training), ``masa.compress``
(training-free compression), ``masa.eval`` (perplexity and fidelity), ``masa.bench`` (benchmarks).
"""

__version__ = "0.1.0"

from masa.accounting import ParamCount, count  # noqa: E402
from masa.io import load, save  # noqa: E402
from masa.sharing import ShareConfig, collapse_generators, share  # noqa: E402

__all__ = [
    "ParamCount",
    "ShareConfig",
    "__version__",
    "collapse_generators",
    "count",
    "load",
    "save",
    "share",
]
