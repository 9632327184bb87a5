"""The one error type of the checkpoint loaders: it names the file, the key and the shapes."""


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read or does not fit the ViT it is loaded into."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The checkpoint path does not exist (also a FileNotFoundError, for callers that catch it)."""
