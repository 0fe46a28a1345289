"""Datasets, readers and open-set protocols.

Every reader returns uint8 images N×H×W×C and int64 labels (:class:`ImageSet`).
"""

from gradosr.data.imageset import ImageSet
from gradosr.data.idx import read_idx
from gradosr.data.protocols import (
    PROTOCOLS,
    OSRData,
    ProtocolSpec,
    load_protocol,
    parse_index_list,
    resolve_protocol,
)
from gradosr.data.registry import DATASETS, data_root, dataset_info, load_dataset, locate_dataset

__all__ = [
    "ImageSet", "read_idx", "PROTOCOLS", "OSRData", "ProtocolSpec", "load_protocol",
    "parse_index_list", "resolve_protocol", "DATASETS", "data_root", "dataset_info",
    "load_dataset", "locate_dataset",
]
