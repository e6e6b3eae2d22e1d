"""Datasets, file readers and partitions for metagg.

    >>> from metagg.data import load_dataset, partition
    >>> ds = load_dataset("digits")                          # built in
    >>> parts = partition(ds.y_train, 8, "dirichlet", alpha=0.5, seed=0)

``load_dataset`` gives float32 inputs in [0, 1] and int64 labels for the built-in
datasets (``digits``, ``fashion_mnist``, ``mnist``, ``cifar10``) and for user data in
an ``.npz`` file; ``partition`` splits sample indices among workers. The readers
(``read_idx``, ``read_cifar_batch``) never run code from the files they read.
"""

from metagg.data.cifar import read_cifar_batch, write_cifar_batch
from metagg.data.datasets import DATASETS, Dataset, load_dataset
from metagg.data.download import download_file, file_hash
from metagg.data.idx import read_idx, write_idx
from metagg.data.partition import PARTITIONS, partition

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "download_file",
    "file_hash",
    "load_dataset",
    "partition",
    "read_cifar_batch",
    "read_idx",
    "write_cifar_batch",
    "write_idx",
]
