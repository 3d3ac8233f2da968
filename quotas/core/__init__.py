"""Framework-free core: window settings, decisions and limits. No Django, DRF or Celery."""
