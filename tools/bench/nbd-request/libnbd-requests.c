// Client CPU per NBD request with libnbd in C: QD requests of SIZE bytes in flight, N in all.
// The lower bound for any libnbd binding (the binding's own cost comes on top).
#include <libnbd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
static int inflight = 0; static long done = 0;
static int cb(void *u, int *err) { inflight--; done++; if (*err) { fprintf(stderr,"err %d\n",*err); exit(1);} return 1; }
int main(int argc, char **argv) {
  const char *uri = argv[1]; long n = atol(argv[2]); long size = atol(argv[3]); int qd = atoi(argv[4]); int wr = argc > 5 && argv[5][0]=='w';
  struct nbd_handle *h = nbd_create(); if (nbd_connect_uri(h, uri) == -1) { fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
  int64_t esize = nbd_get_size(h);
  char *buf = aligned_alloc(4096, size * qd); memset(buf, 1, size*qd);
  struct rusage r0, r1; struct timespec t0, t1; getrusage(RUSAGE_SELF, &r0); clock_gettime(CLOCK_MONOTONIC, &t0);
  long issued = 0; uint64_t off = 0;
  while (done < n) {
    while (inflight < qd && issued < n) {
      nbd_completion_callback c = { .callback = cb };
      int64_t rc = wr ? nbd_aio_pwrite(h, buf + (issued % qd) * size, size, off, c, 0) : nbd_aio_pread(h, buf + (issued % qd) * size, size, off, c, 0);
      if (rc == -1) { fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
      inflight++; issued++; off += size; if (off + size > esize) off = 0;
    }
    if (nbd_poll(h, -1) == -1) { fprintf(stderr, "%s\n", nbd_get_error()); return 1; }
  }
  clock_gettime(CLOCK_MONOTONIC, &t1); getrusage(RUSAGE_SELF, &r1);
  double u = (r1.ru_utime.tv_sec - r0.ru_utime.tv_sec) + (r1.ru_utime.tv_usec - r0.ru_utime.tv_usec)/1e6;
  double s = (r1.ru_stime.tv_sec - r0.ru_stime.tv_sec) + (r1.ru_stime.tv_usec - r0.ru_stime.tv_usec)/1e6;
  double w = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec)/1e9;
  printf("libnbd %s size=%ld qd=%d n=%ld: wall %.3f s, %.0f req/s, cpu user %.2f us/req sys %.2f us/req\n", wr?"write":"read", size, qd, n, w, n/w, u*1e6/n, s*1e6/n);
  nbd_shutdown(h, 0); nbd_close(h); return 0;
}
