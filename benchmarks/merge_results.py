"""Merge benchmark results of the same protocol and methods on disjoint splits (seeds
run in separate sessions or on separate machines) into one report folder.

    PYTHONPATH=src python benchmarks/merge_results.py OUT A/results.json B/results.json ...

Writes ``OUT/results.{json,md,csv}``: every record as it was, the mean ± std summary and
the cost recomputed over all of them, ``commands`` listing every run's command
(:func:`gradosr.evaluation.benchmark.merge_documents`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gradosr.errors import GradOSRError
from gradosr.evaluation.benchmark import merge_documents, write_results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="the report folder to write")
    ap.add_argument("documents", nargs="+", help="results.json files")
    args = ap.parse_args(argv)
    try:
        docs = []
        for path in args.documents:
            try:
                docs.append(json.loads(Path(path).read_text()))
            except (OSError, ValueError) as exc:
                raise GradOSRError(f"{path}: not a readable results document ({exc})") from None
        doc = merge_documents(docs)
    except GradOSRError as exc:
        print(f"merge_results: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out, doc)
    print(f"{len(doc['results'])} records of splits {[s['split'] for s in doc['splits']]} written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
