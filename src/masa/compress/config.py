"""What ``masa.compress`` should do: method, budget, targets and calibration size."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from masa.budget import check_ratio

TARGET_PRESETS = ("attn", "all-linear")
COMPENSATIONS = ("eora",)


def parse_compensation(text: str) -> tuple[str, int | float | None]:
    """``eora`` -> (``eora``, None): the compression/compensation split is searched; ``eora:16`` -> rank 16
    for every layer; ``eora:0.2`` -> 20 % of the stored budget spent on the corrections."""
    kind, _, value = str(text).partition(":")
    hint = "give eora, eora:RANK (an integer >= 1) or eora:FRACTION (in (0, 1))"
    if kind not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {text!r}; {hint}")
    if not value:
        return kind, None
    try:
        amount = int(value) if value.isdigit() else float(value)
    except ValueError:
        raise ValueError(f"compensation {text!r} is not a rank or a fraction; {hint}") from None
    if (isinstance(amount, int) and amount < 1) or (isinstance(amount, float) and not 0.0 < amount < 1.0):
        raise ValueError(f"compensation {text!r} is out of range; {hint}")
    return kind, amount


@dataclass
class CompressConfig:
    """Training-free compression settings.

    Attributes:
        method: a registered method name (``svd``, ``asvd``, ``svd-llm``, ``masa`` ...).
        ratio: compression ratio of the targeted weights, in (0, 1) (the accounting of docs/compression.md accounting).
        targets: ``attn`` (q, k, v, o of every block), ``all-linear`` (every projection role of the
            blocks), or module-name patterns (a name suffix or a regex over full names).
        exclude: regexes over full module names left uncompressed.
        calib_samples: calibration sequences N (more rows make better-conditioned Gram matrices).
        calib_len: tokens per calibration sequence T.
        seed: seed of any randomness in a method.
        options: method-specific options (e.g. ``alpha`` for asvd, ``refit`` for svd-llm), validated by
            the method.
        compensate: ``None``, or ``eora[:RANK|:FRACTION]`` (:func:`parse_compensation`): a low-rank
            correction of each compressed layer's error, its numbers counted in ``ratio``.
    """

    method: str
    ratio: float
    targets: tuple[str, ...] = ("attn",)
    exclude: tuple[str, ...] = ()
    calib_samples: int = 32
    calib_len: int = 256
    seed: int = 0
    options: dict = field(default_factory=dict)
    compensate: str | None = None

    def __post_init__(self):
        if not isinstance(self.method, str) or not self.method:
            raise ValueError(f"method must be a method name such as 'svd-llm', got {self.method!r}")
        self.ratio = check_ratio(self.ratio)
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ValueError(
                f"targets must be 'attn', 'all-linear' or module-name patterns, got {self.targets!r}"
            )
        if len(self.targets) > 1 and set(self.targets) & set(TARGET_PRESETS):
            raise ValueError(
                f"targets {self.targets!r} mix a preset ({' or '.join(TARGET_PRESETS)}) with patterns: "
                "give one preset alone, or only patterns"
            )
        self.exclude = (self.exclude,) if isinstance(self.exclude, str) else tuple(self.exclude)
        for pattern in (*self.exclude, *(t for t in self.targets if t not in TARGET_PRESETS)):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"pattern {pattern!r} is not a valid regex ({err}); escape it") from err
        for name in ("calib_samples", "calib_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.options, dict):
            raise ValueError(f"options must be a dict of method options, got {self.options!r}")
        if self.compensate is not None:
            parse_compensation(self.compensate)
