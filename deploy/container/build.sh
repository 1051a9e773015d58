#!/usr/bin/env bash
# Builds the dask-rs binaries in release mode and copies them to DEST (default: ./dist/bin).
# The Containerfile runs this in its build stage; CI runs it on the host, so the image's
# build step is checked even where no registry can be reached to build the image itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest="${1:-dist/bin}"
cargo build --release --locked -p dask-scheduler -p dask-worker --bins
mkdir -p "$dest"
for b in dask-scheduler dask-worker dask-nanny; do
    install -m 0755 "target/release/$b" "$dest/$b"
done
"$dest/dask-scheduler" --version
"$dest/dask-worker" --version
