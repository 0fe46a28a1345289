"""The in-memory container every reader returns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradosr.errors import DataError


@dataclass(frozen=True)
class ImageSet:
    """Images and labels held in memory.

    Attributes:
        images: uint8 array N×H×W×C (C = 1 or 3).
        labels: int64 array N.
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(
                f"images must be a uint8 array N×H×W×C, got dtype {self.images.dtype} "
                f"and shape {self.images.shape}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"labels must be a 1-D array of length {len(self.images)}, got shape "
                f"{self.labels.shape}"
            )
        if self.labels.dtype != np.int64:
            object.__setattr__(self, "labels", self.labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        """The samples at ``index`` (an integer or boolean array), as a new ImageSet."""
        return ImageSet(self.images[index], self.labels[index])

    def with_labels(self, labels: np.ndarray) -> "ImageSet":
        """The same images with other labels (length N)."""
        return ImageSet(self.images, np.asarray(labels, dtype=np.int64))
