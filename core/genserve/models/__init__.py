"""Model architectures, each one a plugin registered under its ``config.model_type``."""
