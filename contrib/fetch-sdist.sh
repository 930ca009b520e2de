#!/usr/bin/env bash
# Downloads a pinned sdist, checks its sha256 twice and unpacks it (shared by
# contrib/llfuse/build.sh and contrib/pyfuse3/build.sh).
#
# Usage: contrib/fetch-sdist.sh PYTHON NAME VERSION SHA256FILE DIR
#   pip (of PYTHON) downloads NAME==VERSION as an sdist with --require-hashes against the
#   hash in SHA256FILE ("<hex>  <file>"), sha256sum checks the file again so that nothing
#   else in the directory can slip through, and it is unpacked into DIR/NAME-VERSION.
set -euo pipefail
if [ $# -ne 5 ]; then
  echo "usage: $0 PYTHON NAME VERSION SHA256FILE DIR" >&2
  exit 2
fi
py=$1 name=$2 version=$3 sums=$4 dir=$5
printf '%s==%s --hash=sha256:%s\n' "$name" "$version" "$(cut -d' ' -f1 "$sums")" > "$dir/requirements.txt"
"$py" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps \
  --require-hashes -r "$dir/requirements.txt" -d "$dir/dl"
(cd "$dir/dl" && sha256sum --quiet --strict -c "$sums")
tar xzf "$dir/dl/$name-$version.tar.gz" -C "$dir"
