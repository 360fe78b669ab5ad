"""Python client of the Generative Adapter server."""

from clients.client import ApiError, GenerativeAdapterClient

__all__ = ["ApiError", "GenerativeAdapterClient"]
