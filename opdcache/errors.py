"""Errors a user can act on; the CLI prints their message alone, without a traceback."""


class OpdcacheError(Exception):
    """Base class for errors caused by input, configuration or run-directory state."""


class CacheFormatError(OpdcacheError):
    """A cache or score shard is unreadable, of another schema version, or breaks the contract."""


class ConfigError(OpdcacheError):
    """A config file has unknown keys, wrong types or invalid values."""
