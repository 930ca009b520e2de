/* The floor of a full walk through FUSE: a tree of DIRS directories x FILES small files
   served from memory by a libfuse low-level filesystem in C (no Python, no fetching), so
   what is left is what the FUSE protocol costs per file.  Built and run by
   bench/bench_walk_floor.py, for libfuse 2 (the library llfuse wraps) and, with -DFUSE3,
   for libfuse 3.
     usage: fuse_walk_floor MOUNTPOINT DIRS FILES MODE
   MODE (libfuse 3 only; libfuse 2 always lists with READDIR):
     readdir   READDIR, then one LOOKUP and one READ per file (what llfuse can do);
     plus      READDIRPLUS: the listing carries each entry's attributes, so the kernel
               makes the inodes and dentries and sends no LOOKUP;
     push      READDIRPLUS, and at the first READ of a file of a directory, the other files of
               the directory listed since the last push are written into the kernel's page cache
               (FUSE_NOTIFY_STORE: their inodes exist since the listing), so they need no READ.
   OPEN is answered with ENOSYS (the kernel's "no_open": no OPEN or RELEASE), FLUSH too.
   Requests are served by libfuse's multi-threaded loop, as lazyd's worker serves them with
   several llfuse threads (the single-threaded loop walked 2.8x slower with libfuse 2).
   File i of directory d is "dNN/fNNNNNN", inode FILE0 + d * FILES + i, of
   (inode * 2654435761) % 1400 bytes of zeros; every time stamp is 0. */
#ifdef FUSE3
#define FUSE_USE_VERSION 35
#include <fuse3/fuse_lowlevel.h>
#else
#define FUSE_USE_VERSION 26
#include <fuse/fuse_lowlevel.h>
#endif
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_DIRS 1000
static int DIRS, FILES, PLUS, PUSH;
static char zeros[2048];
static int batch_lo[MAX_DIRS], batch_hi[MAX_DIRS]; /* per directory: files listed and not pushed yet */
static pthread_mutex_t batch_lock = PTHREAD_MUTEX_INITIALIZER;
#define FILE0 ((fuse_ino_t)DIRS + 2)
#ifdef FUSE3
static struct fuse_session *SESSION;
#endif

static int is_dir(fuse_ino_t ino) { return ino >= 2 && ino < FILE0; }
static void stat_of(fuse_ino_t ino, struct stat *st) {
  memset(st, 0, sizeof *st);
  st->st_ino = ino;
  if (ino == 1 || is_dir(ino)) { st->st_mode = S_IFDIR | 0755; st->st_nlink = 2; st->st_size = 4096; }
  else { st->st_mode = S_IFREG | 0644; st->st_nlink = 1; st->st_size = (ino * 2654435761u) % 1400; }
}
static void entry_of(fuse_ino_t ino, struct fuse_entry_param *e) {
  memset(e, 0, sizeof *e);
  e->ino = ino; e->attr_timeout = 3600; e->entry_timeout = 3600;
  stat_of(ino, &e->attr);
}
static void ll_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
  struct stat st; stat_of(ino, &st); fuse_reply_attr(req, &st, 3600.0);
}
static void ll_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
  struct fuse_entry_param e; int i;
  if (parent == 1 && sscanf(name, "d%d", &i) == 1 && i >= 0 && i < DIRS) { entry_of(i + 2, &e); fuse_reply_entry(req, &e); return; }
  if (is_dir(parent) && sscanf(name, "f%d", &i) == 1 && i >= 0 && i < FILES) {
    entry_of(FILE0 + (parent - 2) * FILES + i, &e); fuse_reply_entry(req, &e); return;
  }
  fuse_reply_err(req, ENOENT);
}
static void ll_enosys(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, ENOSYS); }
#ifdef FUSE3
static void push_batch(fuse_ino_t ino) {
  int d = (ino - FILE0) / FILES;
  pthread_mutex_lock(&batch_lock);
  int lo = batch_lo[d], hi = batch_hi[d];
  batch_lo[d] = batch_hi[d] = 0;
  pthread_mutex_unlock(&batch_lock);
  for (int i = lo; i < hi; i++) {
    fuse_ino_t child = FILE0 + d * FILES + i; struct stat st; stat_of(child, &st);
    if (child == ino || st.st_size == 0) continue;
    struct fuse_bufvec bv = FUSE_BUFVEC_INIT(st.st_size);
    bv.buf[0].mem = zeros;
    fuse_lowlevel_notify_store(SESSION, child, 0, &bv, 0);
  }
}
#endif
static void ll_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
  struct stat st; stat_of(ino, &st);
#ifdef FUSE3
  if (PUSH) push_batch(ino);
#endif
  if (off >= st.st_size) { fuse_reply_buf(req, NULL, 0); return; }
  fuse_reply_buf(req, zeros, (size_t)(st.st_size - off) < size ? (size_t)(st.st_size - off) : size);
}
static void ll_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_open(req, fi); }
static void ll_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) { fuse_reply_err(req, 0); }
static void list(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, int plus) {
  char *buf = malloc(size), name[32];
  size_t used = 0;
  int n = ino == 1 ? DIRS : FILES;
  int d = is_dir(ino) ? (int)ino - 2 : -1, first = -1, last = -1;
  for (int i = off; i < n; i++) {
    fuse_ino_t child = ino == 1 ? (fuse_ino_t)i + 2 : FILE0 + (ino - 2) * FILES + i;
    size_t len;
    if (ino == 1) sprintf(name, "d%02d", i); else sprintf(name, "f%06d", i);
#ifdef FUSE3
    if (plus) { struct fuse_entry_param e; entry_of(child, &e); len = fuse_add_direntry_plus(req, buf + used, size - used, name, &e, i + 1); }
    else
#endif
    { struct stat st; stat_of(child, &st); len = fuse_add_direntry(req, buf + used, size - used, name, &st, i + 1); }
    if (len > size - used) break;
    used += len;
    if (first < 0) first = i;
    last = i + 1;
  }
  if (d >= 0 && first >= 0) {
    pthread_mutex_lock(&batch_lock);
    if (batch_hi[d] == batch_lo[d]) batch_lo[d] = first;
    if (batch_hi[d] < last) batch_hi[d] = last;
    pthread_mutex_unlock(&batch_lock);
  }
  fuse_reply_buf(req, buf, used);
  free(buf);
}
static void ll_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) { list(req, ino, size, off, 0); }
#ifdef FUSE3
static void ll_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) { list(req, ino, size, off, 1); }
static void ll_init(void *userdata, struct fuse_conn_info *conn) {
  conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;  /* always READDIRPLUS, or never */
  if (PLUS) conn->want |= FUSE_CAP_READDIRPLUS; else conn->want &= ~FUSE_CAP_READDIRPLUS;
}
#endif
static struct fuse_lowlevel_ops ops = {
  .lookup = ll_lookup, .getattr = ll_getattr, .open = ll_enosys, .flush = ll_enosys, .read = ll_read,
  .opendir = ll_opendir, .readdir = ll_readdir, .releasedir = ll_releasedir,
#ifdef FUSE3
  .readdirplus = ll_readdirplus, .init = ll_init,
#endif
};

int main(int argc, char **argv) {
  if (argc != 5) { fprintf(stderr, "usage: %s MOUNTPOINT DIRS FILES readdir|plus|push\n", argv[0]); return 2; }
  DIRS = atoi(argv[2]); FILES = atoi(argv[3]);
  PLUS = strcmp(argv[4], "plus") == 0 || strcmp(argv[4], "push") == 0;
  PUSH = strcmp(argv[4], "push") == 0;
  if (DIRS < 1 || DIRS > MAX_DIRS || FILES < 1) { fprintf(stderr, "DIRS must be 1..%d, FILES >= 1\n", MAX_DIRS); return 2; }
  char *fargv[] = {argv[0], "-o", "ro,default_permissions"};
  struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
#ifdef FUSE3
  struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
  if (!se || fuse_session_mount(se, argv[1]) != 0) return 1;
  SESSION = se;
  int r = fuse_session_loop_mt(se, NULL);
  fuse_session_unmount(se);
  fuse_session_destroy(se);
  return r;
#else
  if (PLUS) { fprintf(stderr, "libfuse 2 has no READDIRPLUS\n"); return 2; }
  struct fuse_chan *ch = fuse_mount(argv[1], &args);
  if (!ch) return 1;
  struct fuse_session *se = fuse_lowlevel_new(&args, &ops, sizeof ops, NULL);
  if (!se) return 1;
  fuse_session_add_chan(se, ch);
  int r = fuse_session_loop_mt(se);
  fuse_session_remove_chan(ch);
  fuse_session_destroy(se);
  fuse_unmount(argv[1], ch);
  return r;
#endif
}
