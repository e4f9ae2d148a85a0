"""Settings for every environment: ``from config import Settings, load_settings``."""

from config.settings import ConfigError, Environment, Settings, load_settings

__all__ = ["ConfigError", "Environment", "Settings", "load_settings"]
