"""A fake OpenAI-compatible upstream for tests, the benchmark and ``make run``
(``python -m project.fake_upstream``): see ``server.py``."""
