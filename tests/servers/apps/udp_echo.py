"""Answers each datagram on the inherited UDP socket FD with
"pid <pid> gen <generation>: <datagram>" until SIGTERM.
Usage: udp_echo.py FD
"""
import os
import signal
import socket
import sys

import tiny_http

sock = socket.socket(fileno=int(sys.argv[1]))
sock.settimeout(0.05)
running = True


def stop(signum, frame):
    global running
    running = False


signal.signal(signal.SIGTERM, stop)
tiny_http.notify("READY=1")
while running:
    try:
        data, peer = sock.recvfrom(2048)
    except (socket.timeout, BlockingIOError):
        continue
    reply = "pid %d gen %s: %s" % (os.getpid(), tiny_http.GENERATION, data.decode())
    sock.sendto(reply.encode(), peer)
