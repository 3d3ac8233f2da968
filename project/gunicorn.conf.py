"""gunicorn settings of the demo (``make run``) and of the tests' servers.

Threaded workers: a client that opens a connection and sends its headers slowly, or
nothing, ties up one thread (gunicorn waits for a request's first bytes without one), not
a whole worker, so two such clients no longer stop everyone else. Request bodies are read
with a deadline by ``project.request_body``. In production put a buffering proxy in front
(see the README's deployment notes).
"""

import os

wsgi_app = "project.wsgi:application"
worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = 30  # a worker whose main loop stops for this long is restarted
graceful_timeout = 10
keepalive = 5  # idle kept-alive connections are closed after this many seconds
control_socket_disable = True  # servers run side by side; none needs it


def child_exit(server, worker):
    """A dead worker's live gauges leave the Prometheus scrape (multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
