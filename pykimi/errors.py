"""Error types. Every error a user can cause is one of these, with a one-line message that names the
file, tensor, image or field and what was expected (DESIGN.md, "Bad input")."""


class PykimiError(Exception):
    """Base class of every error pykimi raises on purpose."""


class CheckpointError(PykimiError):
    """A checkpoint file or directory is missing, damaged or not what the model needs."""


class ConfigError(PykimiError):
    """config.json is missing, malformed, not Kimi-VL, or asks for something pykimi does not implement."""


class InputError(PykimiError):
    """A user input (image, prompt, ids, option) is not usable."""


class TokenizerError(PykimiError):
    """tiktoken.model or tokenizer_config.json is missing or malformed."""


class NumericsError(PykimiError):
    """The model produced non-finite values (NaN / inf): the message names the first stage where they appear,
    so damaged weights or a bad setting are found instead of being turned into tokens."""


class ResourceError(PykimiError):
    """The machine cannot give what an option asks for (locked memory, RAM): the message says what is short and
    what would do."""
