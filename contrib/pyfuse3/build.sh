#!/usr/bin/env bash
# Builds and installs pyfuse3 3.5.0 (libfuse 3, on trio) with lazyd's readino patch (see
# readino.patch): read() gets the inode when the kernel sends no file handle, so lazyd's
# pyfuse3 worker can run FUSE in "no_open" mode, as its llfuse worker does.
#
# Usage: contrib/pyfuse3/build.sh PYTHON
#   PYTHON is the interpreter to install into (scripts/setup passes the lazyd venv's).
# The sdist is checked against the sha256 in pyfuse3.sha256 before it is unpacked.  The
# build runs in pip's build isolation (pyfuse3's backend needs Cython, setuptools >= 78
# and setuptools_scm, which pip brings), and Cython compiles the patched .pyx.
# Skips the build when the patched version is already installed.  Needs libfuse3-dev,
# pkg-config, patch, a C compiler and the Python headers; takes about 40 s.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -ne 1 ]; then
  echo "usage: $0 PYTHON" >&2
  exit 2
fi
py=$1
want="3.5.0+lazyd.readino"

have=$("$py" -c 'import pyfuse3; print(pyfuse3.__version__)' 2>/dev/null || true)
if [ "$have" = "$want" ]; then
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$here/../fetch-sdist.sh" "$py" pyfuse3 3.5.0 "$here/pyfuse3.sha256" "$work"
(cd "$work/pyfuse3-3.5.0" && patch -s -p1 --forward < "$here/readino.patch")
# trio, pyfuse3's one dependency, from the index; then pyfuse3 itself from the patched tree.
"$py" -m pip install -q --disable-pip-version-check "trio>=0.22"
"$py" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall "$work/pyfuse3-3.5.0"
got=$(cd / && "$py" -c 'import pyfuse3; print(pyfuse3.__version__)')
if [ "$got" != "$want" ]; then
  echo "$0: installed pyfuse3 is $got, expected $want" >&2
  exit 1
fi
echo "pyfuse3: built and installed $want into $("$py" -c 'import sys; print(sys.prefix)')"
