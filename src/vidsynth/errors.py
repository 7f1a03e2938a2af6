"""The project's exception types: every error a user can cause is one of these, with a message saying what to do."""


class VidsynthError(Exception):
    """Base class of vidsynth's own errors."""


class CheckpointError(VidsynthError, ValueError):
    """A file could not be read as a checkpoint, or is not a kind vidsynth supports."""


class ConfigError(VidsynthError, ValueError):
    """Arguments or configuration that cannot work (sizes, counts, incompatible models)."""
