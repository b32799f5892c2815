"""Exceptions raised by the algorithm core for bad input; front ends report them, never crash."""


class InputError(ValueError):
    """Input geometry (mesh or cloud) is unusable; the message says what and what was expected."""


class CheckpointError(ValueError):
    """A UDF checkpoint is corrupt, foreign, of another format version, or stale."""
