#!/usr/bin/env bash
# Builds and installs llfuse 1.5.2 with lazyd's readino patch (see readino.patch):
# read() gets the inode when the kernel sends no file handle, so lazyd can run
# FUSE in "no_open" mode (no OPEN/RELEASE round trip per open()).
#
# Usage: contrib/llfuse/build.sh PYTHON
#   PYTHON is the interpreter to install into (scripts/setup passes the lazyd
#   venv's).  It must have pip, setuptools and wheel: the build runs with
#   --no-build-isolation so that it uses exactly those.
# The sdist is checked against the sha256 in llfuse.sha256 before it is unpacked.
# Skips the build when the patched version is already installed.  Needs
# libfuse-dev, pkg-config, patch, a C compiler and the Python headers; takes about 20 s.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ne 1 ]; then
  echo "usage: $0 PYTHON" >&2
  exit 2
fi
py=$1
want="1.5.2+lazyd.readino"

# The installed llfuse version, or nothing when llfuse is not installed.
installed_version() {
  "$py" - <<'PY'
from importlib import metadata
try:
    print(metadata.version("llfuse"))
except metadata.PackageNotFoundError:
    print("")
PY
}

have=$(installed_version)
if [ "$have" = "$want" ]; then
  # Installed: prove it loads (libfuse present, built for this interpreter).
  "$py" -c 'import llfuse'
  exit 0
fi
for mod in setuptools wheel; do
  if ! "$py" -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$mod') else 1)"; then
    echo "$0: $py has no '$mod' module; the build needs it (scripts/setup installs it)" >&2
    exit 1
  fi
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$here/../fetch-sdist.sh" "$py" llfuse 1.5.2 "$here/llfuse.sha256" "$work"
(cd "$work/llfuse-1.5.2" && patch -s -p1 --forward < "$here/readino.patch")
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps \
  "$work/llfuse-1.5.2"
got=$("$py" -c 'import llfuse; print(llfuse.__version__)')
if [ "$got" != "$want" ]; then
  echo "$0: installed llfuse is $got, expected $want" >&2
  exit 1
fi
echo "llfuse: built and installed $want into $("$py" -c 'import sys; print(sys.prefix)')"
