"""The demo's settings with one URL more, ``/boom/``, that fails: for the test that a 500 is
logged by the demo's real server. Nothing else differs."""

from project.settings import *  # noqa: F403

ROOT_URLCONF = "tests.server_urls"
