"""Errors shared by the checkpoint readers and the command line (no torch import here,
so ``nf4lib --help`` stays fast)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message is one line for the user."""
