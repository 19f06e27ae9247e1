"""Exceptions with one clear line of text, turned into `optim4rl: error: ...` by the CLI."""


class Optim4RLError(ValueError):
    """Base class: bad user input (config, file, name). The message is shown as is."""


class ConfigError(Optim4RLError):
    """A config key, value or preset is wrong."""


class ParameterFileError(Optim4RLError):
    """An optimizer parameter file is corrupt, truncated, of another architecture or version."""
