"""Evaluation: perplexity under a stated protocol, and fidelity of a compressed model to its original.

``masa.eval.command`` (the ``masa eval`` CLI) is not imported here, so that the API stays importable
without the model-loading machinery.
"""

from masa.eval.datasets import EVAL_SETS, load_eval_text
from masa.eval.fidelity import FidelityResult, fidelity
from masa.eval.perplexity import PROTOCOLS, PerplexityResult, perplexity

__all__ = [
    "EVAL_SETS",
    "PROTOCOLS",
    "FidelityResult",
    "PerplexityResult",
    "fidelity",
    "load_eval_text",
    "perplexity",
]
