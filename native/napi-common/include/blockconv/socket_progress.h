// SocketProgress: whether a TCP socket moved any byte since the last look, from the
// kernel's own counters (TCP_INFO: bytes received, bytes the peer acknowledged). The
// stall timeouts of @blockconv/libnfs and @blockconv/libiscsi are built on it: requests
// fail when nothing has moved for a while, not when they have waited a while, so a slow
// link with many requests queued never trips them, while a dead server, a dropped link
// or a reconnect loop that never gets an answer does. Events on the socket are not
// progress: a reconnect attempt refused at once makes events and moves no data; nor are
// the bytes of a second reconnect before any request completes.
// Header-only, shared by the two bindings.
#pragma once

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

#include <string>
#include <sys/stat.h>

namespace blockconv {

// glibc's struct tcp_info stops before the byte counters (Linux 4.1+) that the kernel's
// uapi struct appends; the uapi only ever grows, so the prefix plus these fields is its layout.
struct TcpInfoWithBytes {
  struct tcp_info base;
  uint64_t pacing_rate, max_pacing_rate, bytes_acked, bytes_received;
};
static_assert(offsetof(TcpInfoWithBytes, bytes_acked) == 120, "struct tcp_info layout");

class SocketProgress {
 public:
  // True when `fd` moved bytes since the previous look. A socket's first look never
  // counts (there is nothing to compare with). Nor do the bytes of a connection made after
  // another one since the last completed request: a reconnect loop that resends its
  // requests and gets answers it cannot parse moves bytes for ever and completes nothing
  // (seen: libnfs 4.0 after an NFS server restart), while one reconnect that works (a
  // target restarted, a slow link) moves bytes from its first second on.
  bool Moved(int fd) {
    ino_t ino;
    uint64_t rx, tx;
    if (!Look(fd, &ino, &rx, &tx)) return false;
    if (!counters_) return true;
    bool same = ino == ino_;
    bool grew = same && (rx > rx_ || tx > tx_);
    if (!same) counted_ = false;
    // A connection counts once it has received something (refused attempts never do).
    if (!counted_ && rx > 0) { counted_ = true; connections_++; }
    ino_ = ino;
    rx_ = rx;
    tx_ = tx;
    return grew && connections_ <= 1;
  }

  // A request completed (answered, with success or an error): the current connection is
  // proven, and bytes count again.
  void Completed(int fd) {
    ino_t ino;
    uint64_t rx, tx;
    if (Look(fd, &ino, &rx, &tx) && ino != ino_) {
      ino_ = ino;
      rx_ = rx;
      tx_ = tx;
    }
    counted_ = true;
    connections_ = 0;
  }

 private:
  bool Look(int fd, ino_t* ino, uint64_t* rx, uint64_t* tx) {
    if (fd < 0) return false;
    struct stat st;
    TcpInfoWithBytes ti = {};
    socklen_t len = sizeof ti;
    if (fstat(fd, &st) != 0 || getsockopt(fd, IPPROTO_TCP, TCP_INFO, &ti, &len) != 0) return false;
    // A kernel without the counters (before 4.1): every look counts as progress, as if
    // there were no stall timeout, rather than failing healthy requests.
    counters_ = len >= offsetof(TcpInfoWithBytes, bytes_received) + sizeof ti.bytes_received;
    *ino = st.st_ino;
    *rx = ti.bytes_received;
    *tx = ti.bytes_acked;
    return true;
  }

  ino_t ino_ = 0;
  uint64_t rx_ = 0, tx_ = 0;
  bool counted_ = false;     // the current socket is among connections_ (or proven)
  int connections_ = 0;      // connections that received bytes since the last completion
  bool counters_ = true;
};

// The stall timeout both bindings use: the clock starts when the connection goes busy,
// moves on with every byte (SocketProgress) and every completion, and runs out when
// nothing has moved for `ms` while requests wait. Times are libuv loop times (ms).
class StallWatch {
 public:
  void Set(uint64_t ms) { ms_ = ms; }
  uint64_t ms() const { return ms_; }
  bool enabled() const { return ms_ > 0; }

  // A request is submitted on an idle connection.
  void Busy(uint64_t now) { last_ = now; }

  void Completed(int fd, uint64_t now) {
    progress_.Completed(fd);
    last_ = now;
  }

  // On the service tick: whether requests have waited `ms` with nothing moving on `fd`.
  bool Stalled(int fd, int outstanding, uint64_t now) {
    if (!ms_) return false;
    if (progress_.Moved(fd)) last_ = now;
    return outstanding > 0 && now - last_ >= ms_;
  }

  // "N s" for messages.
  std::string Seconds() const {
    char secs[32];
    snprintf(secs, sizeof secs, "%g", ms_ / 1000.0);
    return secs;
  }

 private:
  uint64_t ms_ = 0;    // 0: no stall timeout
  uint64_t last_ = 0;  // loop time of the last byte moved, completion, or going busy
  SocketProgress progress_;
};

}  // namespace blockconv
