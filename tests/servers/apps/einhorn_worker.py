"""A worker written for einhorn: it finds its socket the way einhorn's
client libraries do (it must be a child of EINHORN_MASTER_PID; the socket is
EINHORN_FD_<i> of EINHORN_FD_COUNT) and serves HTTP on it.
Usage: einhorn_worker.py [INDEX]
"""
import os
import socket
import sys

import tiny_http


def is_worker():
    return os.getppid() == int(os.environ.get("EINHORN_MASTER_PID", -1))


def get_socket(index=0):
    count = int(os.environ.get("EINHORN_FD_COUNT", 0))
    if index >= count:
        raise IndexError("only %d sockets" % count)
    return socket.socket(fileno=int(os.environ["EINHORN_FD_%d" % index]))


if not is_worker():
    sys.exit("not an einhorn worker: EINHORN_MASTER_PID is not my parent")
if "EINHORN_CHILD_INDEX" not in os.environ:
    sys.exit("no EINHORN_CHILD_INDEX")
index = int(sys.argv[1]) if len(sys.argv) > 1 else 0
tiny_http.serve(get_socket(index), ready=lambda: tiny_http.notify("READY=1"))
