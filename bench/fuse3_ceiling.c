/* The page-cache read ceiling through FUSE with libfuse 3 (llfuse wraps libfuse 2): one
   256 MiB file "big" served from memory.  Built and run by bench/bench_fuse_ceiling.py
   when libfuse3-dev is installed.  usage: fuse3_ceiling MOUNTPOINT */
#define FUSE_USE_VERSION 35
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/stat.h>
static char data[1 << 20];
#define BIG_SIZE (256L << 20)
static void st_of(fuse_ino_t ino, struct stat *st) {
  memset(st, 0, sizeof *st); st->st_ino = ino;
  if (ino == 1) { st->st_mode = S_IFDIR | 0755; st->st_nlink = 2; }
  else { st->st_mode = S_IFREG | 0644; st->st_nlink = 1; st->st_size = BIG_SIZE; }
}
static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { struct stat st; st_of(ino, &st); fuse_reply_attr(req, &st, 3600.0); }
static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  struct fuse_entry_param e; memset(&e, 0, sizeof e);
  if (parent != 1 || strcmp(name, "big")) { fuse_reply_err(req, ENOENT); return; }
  e.ino = 2; e.attr_timeout = 3600; e.entry_timeout = 3600; st_of(2, &e.attr); fuse_reply_entry(req, &e);
}
static void ll_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fi->keep_cache = 1; fuse_reply_open(req, fi); }
static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  if (off >= BIG_SIZE) { fuse_reply_buf(req, NULL, 0); return; }
  size_t n = BIG_SIZE - off < size ? BIG_SIZE - off : size;
  fuse_reply_buf(req, data, n < sizeof data ? n : sizeof data);
}
static struct fuse_lowlevel_ops ops = { .lookup = ll_lookup, .getattr = ll_getattr, .open = ll_open, .read = ll_read };
int main(int argc, char *argv[]) {
  memset(data, 'x', sizeof data);
  char *fargv[] = {argv[0], "-o", "ro,fsname=big3", NULL};
  struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
  struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
  fuse_session_mount(se, argv[1]);
  struct fuse_loop_config cfg = { .clone_fd = 0, .max_idle_threads = 10 };
  int err = fuse_session_loop_mt(se, &cfg);
  fuse_session_unmount(se); fuse_session_destroy(se); return err;
}
