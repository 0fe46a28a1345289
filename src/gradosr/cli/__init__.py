"""The ``gradosr`` command.

Every expected failure is a :class:`gradosr.errors.GradOSRError`: it prints one line
``gradosr: error: …`` on stderr and exits with status 2 (``--debug`` shows the traceback).
An ``OSError`` (a file or folder the system will not read or write) is reported the same way.

Under ``torchrun`` (``torchrun --nproc_per_node=N -m gradosr COMMAND …``) every process runs
the command (:mod:`gradosr.distributed`): training is DistributedDataParallel, extraction
and scoring are sharded; only rank 0 writes files and prints to stdout.
"""

from __future__ import annotations

import contextlib
import io
import sys

from gradosr.cli.commands import (
    _method_options,
    cmd_ablate,
    cmd_benchmark,
    cmd_datasets,
    cmd_evaluate,
    cmd_fit,
    cmd_predict,
    cmd_train,
)
from gradosr.cli.parser import build_parser
from gradosr.errors import GradOSRError

EXIT_ERROR = 2
__all__ = ["main", "build_parser", "EXIT_ERROR", "_method_options"]

COMMANDS = {"ablate": cmd_ablate, "datasets": cmd_datasets, "train": cmd_train, "fit": cmd_fit, "evaluate": cmd_evaluate,
            "benchmark": cmd_benchmark,
            "predict": cmd_predict}


class _Discard(io.TextIOBase):
    """A text stream that drops what is written (stdout of the ranks other than 0)."""

    def write(self, s: str) -> int:
        return len(s)


#: glibc's mallopt parameter number of the mmap threshold (malloc.h: M_MMAP_THRESHOLD)
_M_MMAP_THRESHOLD = -3


def fix_mmap_threshold(size: int = 1 << 17) -> bool:
    """Pin glibc's mmap threshold at ``size`` bytes (its default start). glibc otherwise
    raises it after every freed large block, so that the per-batch activations come from
    the heap, and the heap fragments and grows with the number of batches: about 4 MB
    every few batches, 0.3 GB at 20,000 images (benchmarks/memory.py). Larger blocks
    are then mapped and returned to the system when freed. Returns whether it was set
    (False where the C library is not glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(size)))
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    fix_mmap_threshold()
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = None if argv is None else [str(a) for a in argv]
    if args.command is None:
        parser.print_help()
        return 0
    from gradosr import distributed

    rank = distributed.env_rank()
    where = f" (rank {rank})" if rank else ""  # under torchrun every process reports its own errors
    ok = False
    try:
        with contextlib.redirect_stdout(_Discard()) if rank != 0 else contextlib.nullcontext():
            code = COMMANDS[args.command](args)  # only rank 0 prints results
        ok = True
        return code
    except GradOSRError as exc:
        if getattr(args, "debug", False):
            raise
        print(f"gradosr: error{where}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # the system refused a read or write (permissions, disk full, a file for a folder)
        if getattr(args, "debug", False):
            raise
        print(f"gradosr: error{where}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("gradosr: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown_distributed(wait=ok)


if __name__ == "__main__":
    sys.exit(main())
