#!/bin/bash
# PID 1 of a fresh PID, mount, UTS and cgroup namespace (see tests/systemd/sandbox.py): builds the
# sandbox's root and execs Debian's systemd in it.  Usage: boot.sh WORKDIR UNIT [SRC]
#   SRC             the lazyd checkout the venv's editable install points at, bound read-only at
#                   the same path (the overlay holds only the root file system, and /tmp is a
#                   fresh tmpfs: a checkout under /tmp or on another file system would vanish)
#   WORKDIR/files/  copied over the root (units, config, masks)
#   WORKDIR/t/      a tmpfs mounted here holds the overlay's upper layer and the new root
# The root is an overlay of the machine's / (read only below) and a tmpfs: whatever systemd and
# its units write (/etc, /var, tmpfiles' clean-up of /tmp) stays in the sandbox.  /proc/sys,
# /proc/sysrq-trigger and /sys are read-only, so no sysctl or udev unit changes the machine;
# /sys/fs/cgroup is cgroup2 rooted at the sandbox's own cgroup (the caller moved us there
# before unsharing it).
set -euo pipefail
work=$1
unit=$2
src=${3:-}
mount --make-rprivate /
mount -t tmpfs -o mode=0755 lazyd-sandbox "$work/t"
mkdir "$work/t/upper" "$work/t/work" "$work/t/root"
cp -a "$work/files/." "$work/t/upper/"
root=$work/t/root
mount -t overlay lazyd-sandbox -o "lowerdir=/,upperdir=$work/t/upper,workdir=$work/t/work" "$root"
mount -t proc proc "$root/proc"
for ro in sys sysrq-trigger; do
  [ -e "$root/proc/$ro" ] || continue  # no sysrq-trigger without CONFIG_MAGIC_SYSRQ
  mount --bind "$root/proc/$ro" "$root/proc/$ro"
  mount -o remount,bind,ro "$root/proc/$ro"
done
mount -t sysfs -o ro sysfs "$root/sys"
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid lazyd-sandbox "$root/dev"
for node in null zero full random urandom tty fuse; do
  touch "$root/dev/$node"
  mount --bind "/dev/$node" "$root/dev/$node"
done
mkdir "$root/dev/pts" "$root/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=0755,nosuid,nodev lazyd-sandbox "$root/run"
mount -t tmpfs -o mode=1777,nosuid,nodev lazyd-sandbox "$root/tmp"
if [ -n "$src" ]; then
  mkdir -p "$root$src"
  mount --bind "$src" "$root$src"
  mount -o remount,bind,ro "$root$src"
fi
mkdir "$root/.oldroot"
cd "$root"
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
exec env -i container=lazyd-test PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  /usr/lib/systemd/systemd --log-level=info "--unit=$unit"
