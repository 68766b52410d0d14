"""Writes what its process looks like to OUT as JSON (ids, groups, working
directory, umask, fd limit, environment), sends READY=1 on NOTIFY_SOCKET,
then waits for SIGTERM. Usage: probe.py OUT
"""
import json
import os
import resource
import signal
import sys

import tiny_http

mask = os.umask(0)
os.umask(mask)
state = {
    "pid": os.getpid(),
    "uid": os.getuid(),
    "gid": os.getgid(),
    "groups": sorted(os.getgroups()),
    "cwd": os.getcwd(),
    "umask": mask,
    "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    "env": dict(os.environ),
    "argv": sys.argv,
}
out = sys.argv[1]
with open(out + ".tmp", "w") as f:
    json.dump(state, f)
os.rename(out + ".tmp", out)
signal.signal(signal.SIGTERM, lambda s, f: sys.exit(0))
tiny_http.notify("READY=1")
signal.pause()
