"""Argument types shared by the subcommands (standard library only: the CLI must start without torch)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer (give 1 or more)")
    return number


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    number = int(text)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative (give 0 or more)")
    return number
