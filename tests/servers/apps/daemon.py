"""A classic double-forking daemon: fork, setsid, fork; the grandchild
writes its pid file and serves HTTP on the socket it inherited; the first
and second processes exit. Its LISTEN_PID would no longer match, so it takes
the fd from argv. Usage: daemon.py PIDFILE FD
"""
import os
import socket
import sys

import tiny_http

pidfile, fd = sys.argv[1], int(sys.argv[2])

if os.fork() > 0:
    os._exit(0)
os.setsid()
if os.fork() > 0:
    os._exit(0)

sock = socket.socket(fileno=fd)
with open(pidfile + ".tmp", "w") as f:
    f.write("%d\n" % os.getpid())
os.rename(pidfile + ".tmp", pidfile)
tiny_http.serve(sock)
