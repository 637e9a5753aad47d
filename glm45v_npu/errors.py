"""User-facing errors: each names the file, tensor or argument at fault, so the CLI prints one line."""


class Glm45vError(ValueError):
    """Base class for mistakes a user can fix (bad checkpoint, bad argument, bad image)."""


class ConfigError(Glm45vError):
    """config.json is missing, unsupported or inconsistent."""


class CheckpointError(Glm45vError):
    """A safetensors shard is missing, corrupt, or does not match the config."""
