"""The exceptions that mean "bad input" (not a bug): entry points report them in one line."""

from alexnet_jax.checkpointing import CheckpointError
from alexnet_jax.data.sources import DatasetNotFoundError, TooManyBadRecordsError
from alexnet_jax.models import UnknownModelError
from alexnet_jax.sharding import MeshError

# ValueError covers config validation (model spec, schedule, dtype, class count).
# TooManyBadRecordsError: the data on disk is damaged beyond dataset.max_bad_fraction.
USER_ERRORS = (CheckpointError, DatasetNotFoundError, UnknownModelError, MeshError, ValueError,
               TooManyBadRecordsError)
