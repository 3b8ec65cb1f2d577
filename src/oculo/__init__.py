"""oculo: a self-hosted, OpenAI-compatible vision inference API."""

__version__ = "0.1.0"
