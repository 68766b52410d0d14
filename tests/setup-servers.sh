#!/bin/sh
# Installs what tests/servers.rs runs behind nogap: nginx and Starman with
# Server::Starter (Debian), gunicorn and uvicorn (PyPI, in a venv built on
# Debian's python3 so an unprivileged user can run it), and the unprivileged
# user the tests run workers as.
# Node.js is expected on the machine already.
#
# Idempotent and quick when everything is there. Run as root. The tests find
# the venv at $NOGAP_TEST_VENV (default /var/cache/nogap-test/venv).
set -eu

VENV=${NOGAP_TEST_VENV:-/var/cache/nogap-test/venv}
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

if ! [ -x "$VENV/bin/gunicorn" ] || ! [ -x "$VENV/bin/uvicorn" ]; then
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q gunicorn uvicorn
fi
chmod -R a+rX "$(dirname "$VENV")"

command -v node >/dev/null || {
    echo "setup-servers.sh: node not found; install Node.js" >&2
    exit 1
}

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
echo "setup-servers.sh: nginx $(/usr/sbin/nginx -v 2>&1 | sed 's/.*\///'), starman, $("$VENV/bin/gunicorn" --version), uvicorn $("$VENV/bin/uvicorn" --version | cut -d' ' -f3), node $(node --version), user $TEST_USER"
