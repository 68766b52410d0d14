"""A worker written for einhorn: it finds its socket the way einhorn's
client libraries do (it must be a child of EINHORN_MASTER_PID; the socket is
EINHORN_FD_<i> of EINHORN_FD_COUNT) and serves HTTP on it. It says it is
ready with READY=1 or, with --ack, with einhorn's manual ACK on
EINHORN_SOCK_PATH, byte for byte what Einhorn::Worker.ack! sends; with
--bad-line-first it first sends a line that is not a request.
Usage: einhorn_worker.py [--ack] [--bad-line-first] [INDEX]
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


def ack(bad_line_first=False):
    """Einhorn::Worker.ack!: YAML.dump of the request, '%' and newlines
    escaped, one line, on a new connection to EINHORN_SOCK_PATH."""
    request = "---\ncommand: worker:ack\npid: %d\n" % os.getpid()
    line = request.replace("%", "%25").replace("\n", "%0A") + "\n"
    if bad_line_first:
        line = "this is not einhorn's protocol\n" + line
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(os.environ["EINHORN_SOCK_PATH"])
        s.sendall(line.encode())


if not is_worker():
    sys.exit("not an einhorn worker: EINHORN_MASTER_PID is not my parent")
if "EINHORN_CHILD_INDEX" not in os.environ:
    sys.exit("no EINHORN_CHILD_INDEX")
args = sys.argv[1:]
manual_ack = "--ack" in args
bad_line_first = "--bad-line-first" in args
args = [a for a in args if not a.startswith("--")]
index = int(args[0]) if args else 0
if manual_ack:
    ready = lambda: ack(bad_line_first)
else:
    ready = lambda: tiny_http.notify("READY=1")
tiny_http.serve(get_socket(index), ready=ready)
