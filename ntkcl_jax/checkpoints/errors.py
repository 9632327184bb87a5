"""The one error type of the checkpoint loaders: it names the file, the key and the shapes."""
from ntkcl_jax import cli


class CheckpointError(cli.InputError, ValueError):
  """A checkpoint file that cannot be read or does not fit the model it is loaded into (the
  user's input: entry points report it as one error line, exit code 2)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint path does not exist (also a FileNotFoundError, for callers that catch it)."""
