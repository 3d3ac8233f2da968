"""The demo gateway: an OpenAI-compatible endpoint guarded by the ``quotas`` app."""
