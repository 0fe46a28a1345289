"""Datasets named by a path or a synthetic set, wherever a dataset name is accepted.

Names (``--dataset``, ``--known-dataset``, ``--unknown-dataset``, the protocol builders):

- ``folder:PATH``: an image folder (:mod:`gradosr.data.folders`);
- ``npz:PATH``: a NumPy archive (:mod:`gradosr.data.arrays`);
- a bare ``PATH`` that exists: a folder, or a file ending in ``.npz``; a registered
  name (``mnist-sample``, ...) wins over a folder of the same name;
- ``synthetic-<name>``: a generated outlier set (:mod:`gradosr.data.synthetic`), only
  as the unknowns of a ``cross`` protocol.

:func:`canonical_name` turns a path into ``folder:/absolute/path`` or
``npz:/absolute/path.npz``, the form recorded in a run's protocol, so the run folder
can be evaluated from any working directory. Loaded datasets are kept for the process
(keyed by the name, the reading options and the files' sizes and modification times),
so a benchmark reads a folder once for all its splits.
"""

from __future__ import annotations

import os
from pathlib import Path

from gradosr.data.imageset import ImageSource
from gradosr.data.synthetic import GENERATORS, PREFIX, is_synthetic, synthetic_names
from gradosr.errors import ConfigError

KINDS = ("folder", "npz")
_CACHE: dict[tuple, tuple[ImageSource, ImageSource, tuple[str, ...]]] = {}


def split_name(name: str) -> tuple[str, Path] | None:
    """(kind, path) of a path dataset name (``folder:…``, ``npz:…`` or an existing
    path), or None when ``name`` is not one."""
    kind, sep, rest = name.partition(":")
    if sep and kind in KINDS:
        if not rest:
            raise ConfigError(f"dataset {name!r} names no path: use {kind}:PATH")
        return kind, Path(rest).expanduser()
    path = Path(name).expanduser()
    if path.is_dir():
        return "folder", path
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise ConfigError(f"dataset {name!r} is a file but not an .npz archive: give an image folder "
                              "(folder:PATH) or an .npz (npz:PATH)")
        return "npz", path
    return None


def canonical_name(name: str) -> str | None:
    """``kind:/absolute/path`` of a path dataset (checked to exist), the name of a
    synthetic set as it is, or None for any other name."""
    if is_synthetic(name):
        if name[len(PREFIX):] not in GENERATORS:
            raise ConfigError(f"unknown synthetic set {name!r}; known: {', '.join(synthetic_names())}")
        return name
    parts = split_name(name)
    if parts is None:
        return None
    kind, path = parts
    if kind == "folder" and not path.is_dir():
        raise ConfigError(f"no such folder: {path} (dataset {name!r})")
    if kind == "npz" and not path.is_file():
        raise ConfigError(f"no such file: {path} (dataset {name!r})")
    return f"{kind}:{path.resolve()}"


def _fingerprint(path: Path) -> tuple:
    """Sizes and modification times of the files of ``path`` (a change reloads it)."""
    if path.is_file():
        st = path.stat()
        return ((str(path), st.st_size, st.st_mtime_ns),)
    out = []
    for root, _, files in os.walk(path):
        for f in sorted(files):
            st = os.stat(os.path.join(root, f))
            out.append((os.path.join(root, f), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))


def load_path_dataset(name: str, image_size: int | None = None, strict: bool = False,
                      progress: bool = False, stream: bool = False,
                      num_workers: int | None = None) -> tuple[ImageSource, ImageSource, tuple[str, ...]]:
    """(train, test, class names) of a path dataset; an unlabeled one has an empty train
    part, labels -1 and no class names. ``stream``: a folder is indexed, not loaded
    (:mod:`gradosr.data.indexed`, decoded by ``num_workers`` processes); an archive is
    always read into memory."""
    from gradosr.data.arrays import load_npz
    from gradosr.data.folders import load_folder

    canonical = canonical_name(name)
    if canonical is None or is_synthetic(canonical):
        raise ConfigError(f"{name!r} is not a folder or .npz dataset")
    kind, path = canonical.split(":", 1)
    stream = stream and kind == "folder"
    key = (canonical, image_size, strict, stream, num_workers if stream else None, _fingerprint(Path(path)))
    if key not in _CACHE:
        _CACHE.clear()  # one dataset at a time: a changed folder must not pile up copies
        loaded = (load_folder(path, image_size, strict, progress, stream, num_workers) if kind == "folder"
                  else load_npz(path, image_size))
        _CACHE[key] = loaded
    return _CACHE[key]


def path_dataset_info(name: str):
    """The :class:`gradosr.data.registry.DatasetInfo` of a path dataset or a synthetic set,
    or None when ``name`` is neither. A folder is scanned (no image decoded but the
    first); an archive is read."""
    from gradosr.data.folders import image_format, scan_folder
    from gradosr.data.registry import DatasetInfo

    canonical = canonical_name(name)
    if canonical is None:
        return None
    if is_synthetic(canonical):
        gen = GENERATORS[canonical[len(PREFIX):]]
        return DatasetInfo(canonical, 0, (0, 0), 0, f"generated: {gen.description} ({gen.source})",
                           labelled=False)
    kind, path = canonical.split(":", 1)
    if kind == "folder":
        layout = scan_folder(path)
        size, channels = image_format(layout.first_file(), None)
        classes = layout.classes
    else:
        train, test, classes = load_path_dataset(canonical)
        part = train if len(train) else test
        size, channels = part.shape[:2], part.shape[2]
    return DatasetInfo(canonical, len(classes), tuple(int(s) for s in size), int(channels),
                       f"your {kind} {path}", tuple(classes), labelled=bool(classes))


def check_labelled(info, role: str) -> None:
    """ConfigError when the dataset of ``info`` has no classes but ``role`` needs them."""
    if not info.labelled:
        raise ConfigError(f"{info.name} has no classes (an unlabeled folder or array, or a synthetic set): "
                        f"it can only be the --unknown-dataset of --protocol cross, not {role}")
