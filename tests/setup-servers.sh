#!/bin/sh
# Installs what tests/servers.rs runs behind nogap: nginx, lighttpd, puma
# (with ruby-sd-notify), unicorn, Go (to build tests/servers/apps/go_server.go),
# and Starman with Server::Starter (Debian); gunicorn, uvicorn, hypercorn and
# daphne (PyPI, in a venv built on Debian's python3 so an unprivileged user
# can run it); Express (npm); and the unprivileged user the tests run
# workers as. Node.js is expected on the machine already.
#
# Idempotent and quick when everything is there; on a fresh Debian 12 it
# takes about 45 s (apt about 25 s, pip 8 s, npm 5 s). Run as root. The
# tests find the venv at $NOGAP_TEST_VENV (default
# /var/cache/nogap-test/venv) and Express in $NOGAP_TEST_NODE_MODULES
# (default /var/cache/nogap-test/node/node_modules).
set -eu

VENV=${NOGAP_TEST_VENV:-/var/cache/nogap-test/venv}
NODE_MODULES=${NOGAP_TEST_NODE_MODULES:-/var/cache/nogap-test/node/node_modules}
TEST_USER=nogap-test

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-servers.sh: run as root (it installs packages and adds a user)" >&2
    exit 1
fi

# Debian packages, without starting any service (no daemon on port 80).
need=""
[ -x /usr/sbin/nginx ] || need="$need nginx-light"
/usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || need="$need python3-venv"
[ -x /usr/bin/starman ] || need="$need starman"
perl -MServer::Starter -e1 2>/dev/null || need="$need libserver-starter-perl"
[ -x /usr/sbin/lighttpd ] || need="$need lighttpd"
[ -x /usr/bin/puma ] || need="$need puma"
# puma sends READY=1 only with the sd_notify gem.
ruby -rsd_notify -e1 2>/dev/null || need="$need ruby-sd-notify"
[ -x /usr/bin/unicorn ] || need="$need unicorn"
[ -x /usr/bin/go ] || need="$need golang-go"
if [ -n "$need" ]; then
    need_policy=0
    if ! [ -e /usr/sbin/policy-rc.d ]; then
        need_policy=1
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
    fi
    apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null
    if [ "$need_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
fi

# hypercorn and daphne are pinned to the minor versions whose traps
# docs/handoff.md describes and tests/servers/python.rs checks.
for bin in gunicorn uvicorn hypercorn daphne; do
    if ! [ -x "$VENV/bin/$bin" ]; then
        mkdir -p "$(dirname "$VENV")"
        [ -x "$VENV/bin/pip" ] || /usr/bin/python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q gunicorn uvicorn 'hypercorn==0.18.*' 'daphne==4.2.*'
        break
    fi
done
chmod -R a+rX "$(dirname "$VENV")"

command -v node >/dev/null || {
    echo "setup-servers.sh: node not found; install Node.js" >&2
    exit 1
}
if ! [ -e "$NODE_MODULES/express/package.json" ]; then
    mkdir -p "$(dirname "$NODE_MODULES")"
    (cd "$(dirname "$NODE_MODULES")" && npm install --no-audit --no-fund --silent express@5 >/dev/null)
fi
chmod -R a+rX "$(dirname "$NODE_MODULES")"

if ! getent passwd "$TEST_USER" >/dev/null; then
    useradd --system --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --user-group "$TEST_USER"
fi
# A supplementary group, to check that --user sets them.
if ! getent group nogap-test-extra >/dev/null; then
    groupadd --system nogap-test-extra
fi
if ! id -nG "$TEST_USER" | tr ' ' '\n' | grep -qx nogap-test-extra; then
    usermod -a -G nogap-test-extra "$TEST_USER"
fi
echo "setup-servers.sh: nginx $(/usr/sbin/nginx -v 2>&1 | sed 's/.*\///'), $(/usr/sbin/lighttpd -v | cut -d' ' -f1)," \
    "puma $(puma --version | cut -d' ' -f3), unicorn $(unicorn -v | cut -d' ' -f2), $(go version | cut -d' ' -f3)," \
    "starman, $("$VENV/bin/pip" list 2>/dev/null | grep -iE '^(gunicorn|uvicorn|hypercorn|daphne) ' | tr -s ' ' | paste -sd,)," \
    "node $(node --version), express $(node -p "require('$NODE_MODULES/express/package.json').version"), user $TEST_USER"
