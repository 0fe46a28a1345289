"""Progress bars and log lines: tqdm when it is installed, else plain pass-through.

gradosr runs without tqdm (e.g. on a bare GPU machine with only torch, numpy, scipy,
scikit-learn and safetensors); bars are then silent. In a distributed run only rank 0
shows bars (:mod:`gradosr.distributed`).
"""

from __future__ import annotations

from typing import Iterable, TypeVar

from gradosr.distributed import is_main

try:
    from tqdm.auto import tqdm as _tqdm
except ImportError:  # tqdm is optional at run time
    _tqdm = None

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], disable: bool | None = False, **kwargs) -> Iterable[T]:
    """``tqdm(iterable, disable=disable, **kwargs)``, or ``iterable`` itself when tqdm is
    missing, ``disable`` is True, or this is not rank 0. ``disable=None``: tqdm's own rule
    (off when the output is not a terminal)."""
    if disable is True or _tqdm is None or not is_main():
        return iterable
    return _tqdm(iterable, disable=disable, **kwargs)


def write(line: str) -> None:
    """Print ``line`` without breaking an active progress bar (tqdm.write, else print)."""
    if _tqdm is not None:
        _tqdm.write(line)
    else:
        print(line, flush=True)
