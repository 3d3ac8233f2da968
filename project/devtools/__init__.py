"""Developer tooling of the demo project: find or start Redis, run the whole demo stack.

Nothing here is part of the ``quotas`` app; it exists so ``make run`` and ``make test`` work
on a machine with nothing but Python installed.
"""
