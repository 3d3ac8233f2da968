"""Authentication of the demo gateway."""

from rest_framework.authentication import TokenAuthentication

__all__ = ["BearerTokenAuthentication"]


class BearerTokenAuthentication(TokenAuthentication):
    """DRF token authentication with the header the OpenAI clients send:
    ``Authorization: Bearer <token>``."""

    keyword = "Bearer"
