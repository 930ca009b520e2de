#!/usr/bin/env bash
# Builds and installs llfuse 1.5.2 with lazyd's readino patch (see readino.patch):
# read() gets the inode when the kernel sends no file handle, so lazyd can run
# FUSE in "no_open" mode (no OPEN/RELEASE round trip per open()).
# Usage: contrib/llfuse/build.sh [PYTHON]   (default python3).  Skips the build
# when the patched version is already installed.  Needs libfuse-dev, pkg-config
# and a C compiler; takes about 30 s.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py="${1:-python3}"
want="1.5.2+lazyd.readino"
have=$("$py" -c 'import llfuse; print(llfuse.__version__)' 2>/dev/null || true)
if [ "$have" = "$want" ]; then
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$py" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
  -d "$work" "llfuse==1.5.2" 2>&1 | grep -v "^WARNING: Location" >&2 || true
tar xzf "$work"/llfuse-1.5.2.tar.gz -C "$work"
(cd "$work/llfuse-1.5.2" && patch -s -p1 < "$here/readino.patch")
"$py" -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  --no-build-isolation "$work/llfuse-1.5.2" 2>&1 | grep -v "^WARNING: Location" >&2 || true
got=$("$py" -c 'import llfuse; print(llfuse.__version__)')
if [ "$got" != "$want" ]; then
  echo "contrib/llfuse/build.sh: installed llfuse is $got, expected $want" >&2
  exit 1
fi
echo "llfuse: built and installed $want"
