"""App configuration: wires system checks and signal receivers, nothing else."""

from django.apps import AppConfig


class QuotasConfig(AppConfig):
    """Registers checks and cache-invalidation receivers. No DB or Redis access here."""

    name = "quotas"
    verbose_name = "LLM token quotas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from quotas import checks, receivers  # noqa: F401
