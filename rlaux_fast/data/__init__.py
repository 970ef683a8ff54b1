"""Datasets, the class hierarchy and the loaders. Knows no model and no agent."""

from rlaux_fast.data.datasets import DATASETS, Dataset, Split, load_dataset
from rlaux_fast.data.hierarchy import Hierarchy
from rlaux_fast.data.loaders import LOADERS, Batch, make_loader

__all__ = ["DATASETS", "LOADERS", "Batch", "Dataset", "Hierarchy", "Split", "load_dataset", "make_loader"]
