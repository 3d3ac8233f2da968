"""App configuration: wires system checks, signal receivers and the engine's task queue,
nothing else."""

from django.apps import AppConfig


class QuotasConfig(AppConfig):
    """Registers checks, cache-invalidation receivers and the Celery tasks the engine queues
    its work to (``quotas.engine.dispatch``). No DB or Redis access here."""

    name = "quotas"
    verbose_name = "LLM token quotas"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from quotas import checks, receivers, tasks  # noqa: F401
