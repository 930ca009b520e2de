/* The ceiling of small-file open+read and of page-cache reads through FUSE on this
   machine, without Python: a libfuse 2 low-level filesystem (the library llfuse wraps)
   serving one directory of N small files f0..f{N-1} and one 256 MiB file "big" from
   memory.  Built and run by bench/bench_fuse_ceiling.py.
   usage: fuse_ceiling MOUNTPOINT NFILES NO_OPEN
   NO_OPEN=1 answers OPEN with ENOSYS, after which the kernel stops sending OPEN and
   RELEASE (its "no_open" mode): reads then carry file handle 0 and only the inode. */
#define FUSE_USE_VERSION 26
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/stat.h>
static int N, NO_OPEN;
static char data[1 << 17];
#define BIG_SIZE (256L << 20)
#define BIG_INO ((fuse_ino_t)N + 2)
static void st_of(fuse_ino_t ino, struct stat *st) {
  memset(st, 0, sizeof *st); st->st_ino = ino;
  if (ino == 1) { st->st_mode = S_IFDIR | 0755; st->st_nlink = 2; }
  else { st->st_mode = S_IFREG | 0644; st->st_nlink = 1;
         st->st_size = ino == BIG_INO ? BIG_SIZE : 200 + (ino * 2654435761u) % 7800; }
}
static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  struct stat st; st_of(ino, &st); fuse_reply_attr(req, &st, 3600.0);
}
static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  struct fuse_entry_param e; memset(&e, 0, sizeof e);
  int i;
  if (parent == 1 && strcmp(name, "big") == 0) i = N;
  else if (parent != 1 || sscanf(name, "f%d", &i) != 1 || i < 0 || i >= N) { fuse_reply_err(req, ENOENT); return; }
  e.ino = i + 2; e.attr_timeout = 3600; e.entry_timeout = 3600; st_of(e.ino, &e.attr); fuse_reply_entry(req, &e);
}
static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  if (NO_OPEN) { fuse_reply_err(req, ENOSYS); return; }
  fi->keep_cache = 1; fi->fh = ino; fuse_reply_open(req, fi);
}
static void ll_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, 0); }
static void ll_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, ENOSYS); }
static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  struct stat st; st_of(ino, &st);
  if (off >= st.st_size) { fuse_reply_buf(req, NULL, 0); return; }
  size_t n = st.st_size - off < size ? st.st_size - off : size;
  fuse_reply_buf(req, data, n < sizeof data ? n : sizeof data);
}
static struct fuse_lowlevel_ops ops = { .lookup = ll_lookup, .getattr = ll_getattr, .open = ll_open,
  .read = ll_read, .release = ll_release, .flush = ll_flush };
int main(int argc, char *argv[]) {
  N = atoi(argv[2]); NO_OPEN = atoi(argv[3]); memset(data, 'x', sizeof data);
  char *fargv[] = {argv[0], "-o", "ro,fsname=smallfs", NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
  struct fuse_chan *ch = fuse_mount(argv[1], &args);
  struct fuse_session *se = fuse_lowlevel_new(&args, &ops, sizeof ops, NULL);
  fuse_session_add_chan(se, ch);
  int err = fuse_session_loop_mt(se);
  fuse_session_remove_chan(ch); fuse_session_destroy(se); fuse_unmount(argv[1], ch);
  return err;
}
