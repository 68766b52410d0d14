"""A small threaded HTTP/1.1 server on an inherited listening socket, shared
by the test workers. It answers "pid <pid> gen <generation>" with X-Pid, and
on SIGTERM drains: stop accepting, answer what still comes on open
keep-alive connections with "Connection: close", and exit once those
requests are done.
"""
import http.server
import os
import signal
import socket
import socketserver
import threading

GENERATION = os.environ.get("NOGAP_GENERATION", "0")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = ("pid %d gen %s\n" % (os.getpid(), GENERATION)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pid", str(os.getpid()))
        if self.server.draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    # server_close() joins the connection threads: in-flight requests finish.
    daemon_threads = False
    draining = False

    def __init__(self, sock):
        socketserver.BaseServer.__init__(self, sock.getsockname(), Handler)
        self.socket = sock


def serve(sock, ready=None):
    """Serve on `sock` until SIGTERM; `ready` runs once serving."""
    # Several processes accept on this socket: never block in accept().
    sock.setblocking(False)
    server = Server(sock)

    def stop(signum, frame):
        # shutdown() waits for serve_forever, so not from the handler itself.
        server.draining = True
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    if ready:
        ready()
    server.serve_forever(poll_interval=0.05)
    server.server_close()


def notify(state):
    """sd_notify(state) to NOTIFY_SOCKET, if set."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)
