"""batchd: a daemon that makes the OpenAI Batch API boring to operate."""

__version__ = "0.1.0"
