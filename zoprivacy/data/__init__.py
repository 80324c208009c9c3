"""Poisson batches and the private release of the data set size (Algorithm 1, lines 1-4).

:mod:`~zoprivacy.data.poisson` holds the sampler, the loader and the size release.
"""

from zoprivacy.data.poisson import (
    EMPTY_BATCH,
    EmptyBatch,
    PoissonBatchSampler,
    PredictableSamplingWarning,
    expected_batch_size,
    is_empty_batch,
    poisson_loader,
    release_size,
)

__all__ = [
    "EMPTY_BATCH",
    "EmptyBatch",
    "PoissonBatchSampler",
    "PredictableSamplingWarning",
    "expected_batch_size",
    "is_empty_batch",
    "poisson_loader",
    "release_size",
]
