"""Errors that gpt2fast raises for bad user input.

Every one is a ``ValueError`` so callers can catch bad input without knowing our types.
"""


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, mis-shaped or otherwise unusable.

    Example:
        >>> raise CheckpointError("model.safetensors: tensor 'wte.weight' has shape (3, 4), expected (1000, 96)")
        Traceback (most recent call last):
        ...
        gpt2fast.errors.CheckpointError: model.safetensors: tensor 'wte.weight' has shape (3, 4), expected (1000, 96)
    """
