"""One exception family for everything a user can get wrong; each message says how to fix it."""


class JaxspecError(Exception):
  """Base class: a user-facing error with a one-line message that includes the fix."""


class ModelNotFoundError(JaxspecError):
  """The model name, path or hub id does not resolve to a model."""


class ModelFolderError(JaxspecError):
  """A model folder exists but is missing files or is inconsistent."""


class ChecksumError(JaxspecError):
  """A downloaded file does not have its pinned sha256."""


class PromptTooLongError(JaxspecError):
  """The prompt (plus the requested new tokens) does not fit the cache or the model."""


class UnknownMethodError(JaxspecError):
  """The decoding method name is not registered."""


class InvalidOptionError(JaxspecError):
  """A decoding or sampling option has an invalid value."""


class HeadsFileError(JaxspecError):
  """A trained heads/adapters file is missing, corrupted, or made for another base model."""
