"""Named evaluation texts bundled in the repository's ``data/`` folder, or any text file."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[3] / "data"
"""The repository's bundled corpora (src/masa/eval/datasets.py -> repository root / data)."""

EVAL_SETS: dict[str, str] = {
    "wikitext2-test": "wikitext-2/test.txt",
    "wikitext2-valid": "wikitext-2/valid.txt",
    "ptb-test": "ptb/test.txt",
    "ptb-valid": "ptb/valid.txt",
    "shakespeare": "tinyshakespeare/input.txt",
}
"""Eval-set name -> file under ``data/`` (see data/README.md for provenance and licences)."""


def resolve_eval_path(name_or_path: str | Path) -> Path:
    """File behind an eval-set name, or the given path itself; raises for an unknown name or a missing file."""
    name = str(name_or_path)
    if name in EVAL_SETS:
        path = DATA_DIR / EVAL_SETS[name]
        if not path.is_file():
            raise FileNotFoundError(
                f"eval set {name!r} should be at {path} but is not: restore the repository's data/ folder"
            )
        return path
    path = Path(name).expanduser()
    if path.is_file():
        return path
    if path.suffix or len(path.parts) > 1:
        raise FileNotFoundError(f"eval text file {path} does not exist: check the path")
    raise ValueError(
        f"unknown eval set {name!r}: use one of {', '.join(EVAL_SETS)} or the path of a text file"
    )


def load_eval_text(name_or_path: str | Path) -> str:
    """Whole text of a named eval set (``wikitext2-test``, ``ptb-test``, ...) or of a UTF-8 text file."""
    path = resolve_eval_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"text file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}): "
            "pass a plain text file (a binary or differently encoded file cannot be tokenized)"
        ) from None
    if not text.strip():
        raise ValueError(f"eval text {path} is empty: pass a file with text in it")
    return text
