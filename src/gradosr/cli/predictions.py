"""``gradosr predict``: label image files and folders with a fitted run.

One line per image on stdout (``path<TAB>label<TAB>score``: the class id and name, or
``unknown``; ``error`` and the reason for a file that cannot be read), and with
``--output`` a table of every image: ``.csv`` or ``.jsonl`` with the columns
:data:`COLUMNS`, written atomically once all images are answered. Folders are searched
recursively for image files (:func:`gradosr.data.folders.image_files`), in sorted order.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from gradosr.errors import ConfigError, GradOSRError

COLUMNS = ("path", "label", "class_name", "score", "threshold", "accepted", "error")
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given, and the image files under each folder (recursive, sorted)."""
    from gradosr.data.folders import image_files

    out: list[str] = []
    for p in paths:
        out += [str(f) for f in image_files(Path(p))] if Path(p).is_dir() else [p]
    return out


def render_rows(rows: list[dict], suffix: str) -> str:
    """The rows as CSV (header first) or JSON lines."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def predict_files(run: Path, paths: list[str], args) -> int:
    """Answer every image of ``paths``; exit status 1 when some could not be read."""
    import torch

    from gradosr.checkpoint import atomic_write_text
    from gradosr.distributed import init_distributed
    from gradosr.images import read_image
    from gradosr.osr import GradientOSR
    from gradosr.progress import progress_bar
    from gradosr.progress import write as log
    from gradosr.runs import check_weights

    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"--output {output} must end in .csv or .jsonl")
    if output is not None and output.is_dir():
        raise ConfigError(f"--output {output} is a folder")
    files = expand_paths(paths)
    if not files:
        raise ConfigError(f"no image files in {', '.join(paths)}")
    osr = GradientOSR.load(run, device=init_distributed(args.device), model_ref=args.model)
    check_weights(osr.classifier_, args.weights)
    clf, threshold = osr.classifier_, float(osr.threshold_)
    rows: list[dict] = []
    pending: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        labels, scores = osr.predict(torch.cat([x for _, x in pending]), return_scores=True)
        for (path, _), label, score in zip(pending, labels, scores):
            if label < 0:
                cid, name, text = -1, "unknown", "unknown"
            else:
                cid, name = clf.class_ids[label], clf.class_names[label]
                text = str(cid) if name == str(cid) else f"{cid} ({name})"
            log(f"{path}\t{text}\t{score:.6f}")
            rows.append({"path": path, "label": int(cid), "class_name": name, "score": float(score),
                         "threshold": threshold, "accepted": bool(label >= 0), "error": ""})
        pending.clear()

    failed = 0
    bar = progress_bar(files, desc="predict", unit="img", disable=True if args.no_progress else None)
    for path in bar:
        try:
            pending.append((path, clf.inputs(read_image(path, clf.preprocessing))))
        except GradOSRError as exc:
            flush()
            failed += 1
            log(f"{path}\terror\t{exc}")
            rows.append({"path": path, "label": "", "class_name": "", "score": "", "threshold": threshold,
                         "accepted": "", "error": str(exc)})
            continue
        if len(pending) >= args.batch_size:
            flush()
    flush()
    if output is not None:
        atomic_write_text(output, render_rows(rows, output.suffix.lower()))
        log(f"{len(rows)} predictions written to {output}")
    return 1 if failed else 0
