"""``python -m project.fake_upstream --port 8100 --rpm 60 --tpm 40000`` (see ``server.py``)."""

from project.fake_upstream.server import main

raise SystemExit(main())
