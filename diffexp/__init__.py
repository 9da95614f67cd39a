"""diffexp: an experiment-tracked harness for training unconditional image diffusion models."""

__version__ = "0.1.0"


class DiffexpError(Exception):
    """A problem with the user's input or environment, reported as one line and a non-zero exit."""
