"""App configuration of the demo gateway."""

from django.apps import AppConfig


class GatewayConfig(AppConfig):
    """The demo gateway app; it has no models of its own."""

    name = "project.gateway"
    label = "gateway"
    verbose_name = "Demo LLM gateway"
