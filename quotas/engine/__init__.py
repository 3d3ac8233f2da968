"""The quota engine: limits resolution, reservations and settles, the ledger and its
reconciliation, over the Redis store (``quotas.backends``) and the framework-free core
(``quotas.core``). Integrations (throttle, middleware, views, admin, tasks) reach it through
the ``quotas.services`` facade."""
