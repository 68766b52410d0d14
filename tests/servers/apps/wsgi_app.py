"""A WSGI app for gunicorn behind nogap: answers with the pid that served."""
import os

GENERATION = os.environ.get("NOGAP_GENERATION", "0")


def app(environ, start_response):
    body = ("pid %d gen %s\n" % (os.getpid(), GENERATION)).encode()
    start_response(
        "200 OK",
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("X-Pid", str(os.getpid())),
        ],
    )
    return [body]
