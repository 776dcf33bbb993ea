"""Data sources mapped to the input schema: synthetic, MovieLens-100K, a team's parquet files.

Each loader returns (events, users, labels, spec); userembed.snapshots turns them into the
Feast offline tables.
"""

from userembed.datasets.movielens import load_movielens
from userembed.datasets.parquet import load_parquet
from userembed.datasets.spec import DatasetSpec
from userembed.datasets.synthetic import generate_synthetic

__all__ = ["DatasetSpec", "generate_synthetic", "load_movielens", "load_parquet"]
