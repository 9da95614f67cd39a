"""diffexp: an experiment-tracked harness for training unconditional image diffusion models."""

__version__ = "0.1.0"


class DiffexpError(Exception):
    """A problem with the user's input or environment, reported as one line and a non-zero exit.
    ``everywhere``: every process of a launch raises the same one, and only the first (RANK 0) says it."""

    def __init__(self, *args, everywhere: bool = False):
        super().__init__(*args)
        self.everywhere = everywhere


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): the
    one way diffexp quotes a library's error inside its own one-line messages."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
