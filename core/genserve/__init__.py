"""genserve: a plugin-based LLM inference server with TGI's API."""

__version__ = "0.1.0"
