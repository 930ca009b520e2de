#!/bin/sh
# Builds the containerd snapshotter conformance suite (snapshots/testsuite from Debian's
# containerd 1.6 Go sources) wrapped around `lazyd snapshotter` (tests/conformance/go) into
# OUTDIR/lazyd-snapshotter-suite.test, offline apart from apt. Safe to rerun; Go's build
# cache (OUTDIR/gocache) makes a rebuild cheap.
# Usage: build.sh [OUTDIR]   (default /var/cache/lazyd-conformance)
# Run: OUTDIR/lazyd-snapshotter-suite.test -test.v -test.root -lazyd "python3 -m lazyd.cli.lazyd"
set -eu
OUT=${1:-/var/cache/lazyd-conformance}
HERE=$(cd "$(dirname "$0")" && pwd)
export DEBIAN_FRONTEND=noninteractive
need=""
command -v go >/dev/null 2>&1 || need="$need golang-go"
[ -d /usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite ] || need="$need golang-github-containerd-containerd-dev"
[ -d /usr/share/gocode/src/gotest.tools/assert ] || need="$need golang-github-gotestyourself-gotest.tools-dev"
if [ -n "$need" ]; then
  apt-get -o DPkg::Lock::Timeout=600 update -qq
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq $need >/dev/null
fi
mkdir -p "$OUT"
exec 9>"$OUT/.build.lock"   # one build at a time per OUTDIR (setup and a test run may overlap)
flock 9
# Debian installs gotest.tools v3 at its v1 import path; the suite imports gotest.tools/v3.
mkdir -p "$OUT/gopath/src/gotest.tools"
ln -sfn /usr/share/gocode/src/gotest.tools "$OUT/gopath/src/gotest.tools/v3"
export GO111MODULE=off GOPATH="$OUT/gopath:/usr/share/gocode" GOCACHE="$OUT/gocache" GOPROXY=off GOFLAGS= CGO_ENABLED=0
cd "$HERE/go"
go test -c -o "$OUT/lazyd-snapshotter-suite.test" .
echo "$OUT/lazyd-snapshotter-suite.test"
