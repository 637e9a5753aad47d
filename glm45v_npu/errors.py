"""User-facing errors: each names the file, tensor or argument at fault, so the CLI prints one line."""


class Glm45vError(ValueError):
    """Base class for mistakes a user can fix (bad checkpoint, bad argument, bad image)."""


class ConfigError(Glm45vError):
    """config.json is missing, unsupported or inconsistent."""


class CheckpointError(Glm45vError):
    """A safetensors shard is missing, corrupt, or does not match the config."""


class FieldError(Glm45vError):
    """One option or parameter has a bad value; `field` names it (the CLI turns it into its flag, the server
    into the OpenAI error's `param`)."""

    def __init__(self, owner: str, field: str, value: object, why: str):
        self.field, self.value, self.why = field, value, why
        super().__init__(f"{owner}{field}={value!r}: {why}")
