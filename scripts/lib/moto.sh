# shellcheck shell=bash
# Starts moto, the AWS API emulator from PyPI, in server mode on a free loopback port, for the
# autoscaler's `aws` executor tests (control-plane/tests/scale_executors.rs). Sourced after
# scripts/lib/servers.sh, and called after cf_servers_up (or cf_mariadb_up): it uses their
# CF_TMP, and their cf_stop_servers stops it through its pid file. Exports
# CALLFLEET_TEST_AWS_ENDPOINT.
#
# moto lives in a virtual environment of its own under the user's cache, installed when
# missing or of another version than the pinned one: nothing goes into the system's Python.

CF_MOTO_VERSION=5.2.6

cf_moto_venv() {
    printf '%s/callfleet/moto-venv' "${XDG_CACHE_HOME:-$HOME/.cache}"
}

# Creates the virtual environment and installs moto into it, unless that is already done.
cf_install_moto() {
    local venv installed
    venv=$(cf_moto_venv)
    installed=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null) || true
    [ -x "$venv/bin/moto_server" ] && [ "$installed" = "$CF_MOTO_VERSION" ] && return 0
    # Debian's python3 has no venv (ensurepip) without python3-venv.
    /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null \
        || cf_install_packages /usr/share/doc/python3-venv=python3-venv
    /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null \
        || { cf_log "python3-venv is missing and could not be installed"; return 1; }
    cf_log "installing moto[server] $CF_MOTO_VERSION into $venv"
    rm -rf "$venv"
    /usr/bin/python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$CF_MOTO_VERSION" \
        || { rm -rf "$venv"; cf_log "pip could not install moto[server]==$CF_MOTO_VERSION"; return 1; }
}

cf_start_moto() {
    cf_install_moto
    local port venv
    venv=$(cf_moto_venv)
    port=$(cf_free_port)
    mkdir -p "$CF_TMP/moto"
    "$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$CF_TMP/moto/moto.log" 2>&1 &
    echo $! >"$CF_TMP/moto/moto.pid"
    cf_wait_for "moto" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/moto-api/', timeout=1)" \
        || { tail -30 "$CF_TMP/moto/moto.log" >&2; return 1; }
    export CALLFLEET_TEST_AWS_ENDPOINT="http://127.0.0.1:$port"
    cf_log "moto $CF_MOTO_VERSION on 127.0.0.1:$port"
}
