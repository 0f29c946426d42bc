// Native file I/O that Node's fs lacks: SEEK_DATA/SEEK_HOLE, fallocate, write-behind
// (sync_file_range), in-kernel copies (copy_file_range), a file-to-file copy of a chunk
// with its zero scan in one job (pipe), block device ioctls and aligned buffers for O_DIRECT. Every
// syscall that may block runs on the libuv thread pool (Napi::AsyncWorker) and settles
// a promise, so the event loop never waits on storage. Errors mimic Node's fs errors
// (code, errno, syscall).

#include <napi.h>

#include <blockconv/errno_name.h>
#include <blockconv/napi_args.h>
#include <blockconv/pinned_buffer.h>

#include <vector>

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <functional>
#include <cstddef>
#include <string>
#include <utility>

namespace {

// ---------------------------------------------------------------------------
// Errors

// Builds an Error shaped like Node's fs errors: "ENOSPC: no space left on device,
// fallocate" with code, errno (negative, as libuv reports it) and syscall.
Napi::Value ErrnoError(Napi::Env env, int err, const char* syscall) {
  std::string code = blockconv::ErrnoName(err);
  std::string text = strerror(err);
  if (!text.empty()) text[0] = static_cast<char>(tolower(text[0]));  // libuv style
  Napi::Error error = Napi::Error::New(env, code + ": " + text + ", " + syscall);
  Napi::Object obj = error.Value();
  obj.Set("errno", Napi::Number::New(env, -err));
  obj.Set("code", Napi::String::New(env, code));
  obj.Set("syscall", Napi::String::New(env, syscall));
  return obj;
}

// Argument errors worded as Node's fs words them, with the value received.
constexpr blockconv::ArgWords kArgWords = blockconv::ArgWords::kNodeReceived;

// ---------------------------------------------------------------------------
// Promise-returning worker: `work` runs on the thread pool and fills a Result; the
// main thread turns it into a resolved value (`settle`) or an errno error. `pins` are
// the caller's buffers the work uses: released with the worker, on the main thread.

struct Result {
  int err = 0;                 // errno, 0 on success
  const char* syscall = "";    // for the error message
  double errOffset = -1;       // file offset of the failed call, when known (error.offset)
  uint64_t value = 0;          // size / length
  bool flag = false;           // blockStatus: data or hole
  std::vector<double> list;    // extents: [length, isData] pairs
};

class Worker : public Napi::AsyncWorker {
 public:
  using Work = std::function<void(Result&)>;
  using Settle = Napi::Value (*)(Napi::Env, const Result&);

  template <typename... Pins>
  static Napi::Value Run(Napi::Env env, const char* name, Work work, Settle settle, Pins&&... pins) {
    auto* w = new Worker(env, name, std::move(work), settle);
    (w->pins_.push_back(std::forward<Pins>(pins)), ...);
    Napi::Promise promise = w->deferred_.Promise();
    w->Queue();  // the worker deletes itself after OnOK
    return promise;
  }

 protected:
  void Execute() override { work_(result_); }

  void OnOK() override {
    Napi::Env env = Env();
    if (result_.err != 0) {
      Napi::Value error = ErrnoError(env, result_.err, result_.syscall);
      if (result_.errOffset >= 0) error.As<Napi::Object>().Set("offset", Napi::Number::New(env, result_.errOffset));
      deferred_.Reject(error);
    } else {
      deferred_.Resolve(settle_(env, result_));
    }
  }

 private:
  Worker(Napi::Env env, const char* name, Work work, Settle settle)
      : Napi::AsyncWorker(env, name), deferred_(Napi::Promise::Deferred::New(env)),
        work_(std::move(work)), settle_(settle) {}

  Napi::Promise::Deferred deferred_;
  Work work_;
  Settle settle_;
  Result result_;
  std::vector<blockconv::PinnedBuffer> pins_;
};

Napi::Value SettleVoid(Napi::Env env, const Result&) { return env.Undefined(); }
Napi::Value SettleNumber(Napi::Env env, const Result& r) {
  return Napi::Number::New(env, static_cast<double>(r.value));
}

void Fail(Result& r, const char* syscall) {
  r.err = errno;
  r.syscall = syscall;
}

// ---------------------------------------------------------------------------
// blockStatus(fd, offset, fileSize) -> {data, length}

Napi::Value SettleBlockStatus(Napi::Env env, const Result& r) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("data", Napi::Boolean::New(env, r.flag));
  o.Set("length", Napi::Number::New(env, static_cast<double>(r.value)));
  return o;
}

// Both lseeks happen in one job so a caller pays one thread-pool round trip per extent.
// `atData`: the caller knows data starts at offset (a hole's SEEK_DATA said so), so
// only its end is looked for.
void BlockStatusWork(int fd, uint64_t offset, uint64_t size, Result& r, bool atData = false) {
  if (offset >= size) return;  // nothing left: {data: false, length: 0}
  const uint64_t rest = size - offset;
  off_t data = atData ? static_cast<off_t>(offset) : lseek(fd, static_cast<off_t>(offset), SEEK_DATA);
  if (data < 0) {
    if (errno == ENXIO) {  // no data after offset: a hole up to EOF
      r.value = rest;
    } else if (errno == EINVAL || errno == EOPNOTSUPP) {  // no SEEK_DATA support: all data
      r.flag = true;
      r.value = rest;
    } else {
      Fail(r, "lseek");
    }
    return;
  }
  if (static_cast<uint64_t>(data) > offset) {  // a hole first, up to the next data
    r.value = std::min(static_cast<uint64_t>(data), size) - offset;
    return;
  }
  r.flag = true;
  off_t hole = lseek(fd, static_cast<off_t>(offset), SEEK_HOLE);
  if (hole < 0) {
    // ENXIO: the file shrank under us; report data to the end rather than fail.
    if (errno != ENXIO) Fail(r, "lseek");
    r.value = rest;
    return;
  }
  uint64_t end = std::min(static_cast<uint64_t>(hole), size);
  r.value = end > offset ? end - offset : rest;
}

// extents(fd, offset, fileSize, maxExtents) -> Float64Array [length0, isData0, length1, ...]
// Up to maxExtents consecutive extents from offset in one thread-pool job: a sparse
// file with thousands of small extents then costs a round trip per batch, not per extent.

Napi::Value SettleExtents(Napi::Env env, const Result& r) {
  Napi::Float64Array out = Napi::Float64Array::New(env, r.list.size());
  std::copy(r.list.begin(), r.list.end(), out.Data());
  return out;
}

void ExtentsWork(int fd, uint64_t offset, uint64_t size, uint32_t max, Result& r) {
  r.list.reserve(2 * static_cast<size_t>(max));
  bool atData = false;
  for (uint32_t n = 0; n < max && offset < size; n++) {
    Result one;
    BlockStatusWork(fd, offset, size, one, atData);
    if (one.err != 0) {
      if (n == 0) r = one;  // later failures just end the batch early
      return;
    }
    if (one.value == 0) return;
    r.list.push_back(static_cast<double>(one.value));
    r.list.push_back(one.flag ? 1.0 : 0.0);
    offset += one.value;
    // A hole ends where SEEK_DATA found data: the next extent is data (2 lseeks per
    // data extent and its hole, not 3).
    atData = !one.flag;
  }
}

Napi::Value Extents(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  int fd;
  uint64_t offset, size, max;
  if (!args.AtLeast(4, "extents") || !args.Fd(0, &fd) || !args.Offset(1, "offset", &offset) ||
      !args.Offset(2, "fileSize", &size) || !args.Offset(3, "maxExtents", &max)) {
    return info.Env().Undefined();
  }
  uint32_t m = static_cast<uint32_t>(std::min<uint64_t>(std::max<uint64_t>(max, 1), 65536));
  return Worker::Run(
      info.Env(), "fileio.extents", [=](Result& r) { ExtentsWork(fd, offset, size, m, r); }, SettleExtents);
}

// pwriteSegments(fd, buffer, offset, segments, count): for i < count writes
// buffer[segments[2i], segments[2i+1]) at offset + segments[2i], all in one job. A
// chunk of data split by zero runs then costs one thread-pool round trip, not one per
// piece. The segment list is copied, so the caller may reuse its array at once; the
// buffer stays referenced until the job is done.

void PwriteSegmentsWork(int fd, const uint8_t* data, uint64_t offset, const std::vector<uint64_t>& seg, Result& r) {
  for (size_t i = 0; i + 1 < seg.size(); i += 2) {
    uint64_t pos = seg[i];
    while (pos < seg[i + 1]) {
      ssize_t n = pwrite(fd, data + pos, seg[i + 1] - pos, static_cast<off_t>(offset + pos));
      if (n < 0) {
        if (errno == EINTR) continue;
        Fail(r, "pwrite");
        r.value = offset + pos;  // where it failed
        return;
      }
      if (n == 0) {  // cannot happen for regular files; never spin
        r.err = EIO;
        r.syscall = "pwrite";
        r.value = offset + pos;
        return;
      }
      pos += static_cast<uint64_t>(n);
    }
  }
}

Napi::Value PwriteSegments(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  Napi::Env env = info.Env();
  int fd;
  uint64_t offset, count;
  Napi::Uint8Array buf;
  Napi::Float64Array list;
  if (!args.AtLeast(5, "pwriteSegments") || !args.Fd(0, &fd) || !args.Uint8Array(1, "buffer", &buf) ||
      !args.Offset(2, "offset", &offset) || !args.Float64Array(3, "segments", &list) || !args.Offset(4, "count", &count)) {
    return env.Undefined();
  }
  if (2 * count > list.ElementLength()) {
    args.RangeError("pwriteSegments: count exceeds the segment list");
    return env.Undefined();
  }
  std::vector<uint64_t> seg(2 * count);
  for (size_t i = 0; i < seg.size(); i += 2) {
    double a = list[i], b = list[i + 1];
    if (!(a >= 0 && b >= a && b <= static_cast<double>(buf.ByteLength())) || std::trunc(a) != a || std::trunc(b) != b) {
      args.RangeError("pwriteSegments: segment " + std::to_string(i / 2) + " is outside the buffer");
      return env.Undefined();
    }
    seg[i] = static_cast<uint64_t>(a);
    seg[i + 1] = static_cast<uint64_t>(b);
  }
  blockconv::PinnedBuffer pin(buf);
  const uint8_t* data = pin.data();
  return Worker::Run(
      env, "fileio.pwriteSegments",
      [fd, data, offset, seg = std::move(seg)](Result& r) { PwriteSegmentsWork(fd, data, offset, seg, r); },
      SettleVoid, std::move(pin));
}

// preadSegments(fd, buffer, segments, count): for i < count reads segments[3i+1] bytes
// at file offset segments[3i] into buffer[segments[3i+2]...], all in one job: a format
// driver whose guest range maps to many host runs (qcow2 clusters) pays one thread-pool
// round trip. Bytes past the end of the file read as zeroes, as for a short pread.
// pwriteScatter(fd, buffer, segments, count) is its mirror: it writes
// buffer[segments[3i+2]...] (segments[3i+1] bytes) at file offset segments[3i], so that
// the pieces of one request go to unrelated places (newly allocated qcow2 clusters).

void TransferSegmentsWork(bool write, int fd, uint8_t* data, const std::vector<uint64_t>& seg, Result& r) {
  for (size_t i = 0; i + 2 < seg.size(); i += 3) {
    uint64_t off = seg[i], len = seg[i + 1], at = seg[i + 2], done = 0;
    while (done < len) {
      ssize_t n = write ? pwrite(fd, data + at + done, len - done, static_cast<off_t>(off + done))
                        : pread(fd, data + at + done, len - done, static_cast<off_t>(off + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        Fail(r, write ? "pwrite" : "pread");
        r.value = off + done;
        return;
      }
      if (n == 0) {
        if (write) {  // cannot happen for regular files; never spin
          r.err = EIO;
          r.syscall = "pwrite";
          r.value = off + done;
          return;
        }
        memset(data + at + done, 0, len - done);  // end of file
        break;
      }
      done += static_cast<uint64_t>(n);
    }
  }
}

// Copies `count` triples (file offset, length, place in the buffer) out of `list`, as
// preadSegments, pwriteScatter and pipe take them: the caller may reuse its list at
// once. The index of the first triple not inside a buffer of `limit` bytes, or -1.
ptrdiff_t CopyTriples(const Napi::Float64Array& list, uint64_t count, double limit, std::vector<uint64_t>* out) {
  out->resize(3 * count);
  for (size_t i = 0; i < out->size(); i += 3) {
    double off = list[i], len = list[i + 1], at = list[i + 2];
    bool ok = off >= 0 && len >= 0 && at >= 0 && std::trunc(off) == off && std::trunc(len) == len &&
              std::trunc(at) == at && off <= blockconv::kMaxSafeInteger && at + len <= limit;
    if (!ok) return static_cast<ptrdiff_t>(i / 3);
    (*out)[i] = static_cast<uint64_t>(off);
    (*out)[i + 1] = static_cast<uint64_t>(len);
    (*out)[i + 2] = static_cast<uint64_t>(at);
  }
  return -1;
}

Napi::Value TransferSegments(const Napi::CallbackInfo& info, bool write) {
  blockconv::Args args(info, kArgWords);
  Napi::Env env = info.Env();
  const std::string name = write ? "pwriteScatter" : "preadSegments";
  int fd;
  uint64_t count;
  Napi::Uint8Array buf;
  Napi::Float64Array list;
  if (!args.AtLeast(4, name.c_str()) || !args.Fd(0, &fd) || !args.Uint8Array(1, "buffer", &buf) ||
      !args.Float64Array(2, "segments", &list) || !args.Offset(3, "count", &count)) {
    return env.Undefined();
  }
  if (3 * count > list.ElementLength()) {
    args.RangeError(name + ": count exceeds the segment list");
    return env.Undefined();
  }
  std::vector<uint64_t> seg;
  ptrdiff_t bad = CopyTriples(list, count, static_cast<double>(buf.ByteLength()), &seg);
  if (bad >= 0) {
    args.RangeError(name + ": segment " + std::to_string(bad) + " is outside the buffer");
    return env.Undefined();
  }
  blockconv::PinnedBuffer pin(buf);
  uint8_t* data = pin.data();
  return Worker::Run(
      env, write ? "fileio.pwriteScatter" : "fileio.preadSegments",
      [write, fd, data, seg = std::move(seg)](Result& r) { TransferSegmentsWork(write, fd, data, seg, r); },
      SettleVoid, std::move(pin));
}

Napi::Value PreadSegments(const Napi::CallbackInfo& info) { return TransferSegments(info, false); }
Napi::Value PwriteScatter(const Napi::CallbackInfo& info) { return TransferSegments(info, true); }

Napi::Value BlockStatus(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  int fd;
  uint64_t offset, size;
  if (!args.AtLeast(3, "blockStatus") || !args.Fd(0, &fd) || !args.Offset(1, "offset", &offset) ||
      !args.Offset(2, "fileSize", &size)) {
    return info.Env().Undefined();
  }
  return Worker::Run(
      info.Env(), "fileio.blockStatus", [=](Result& r) { BlockStatusWork(fd, offset, size, r); },
      SettleBlockStatus);
}

// ---------------------------------------------------------------------------
// fallocate(fd, mode, offset, length)

Napi::Value Fallocate(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  int fd;
  int m;
  uint64_t offset, length;
  if (!args.AtLeast(4, "fallocate") || !args.Fd(0, &fd) || !args.Integer(1, "mode", 2147483647.0, &m) ||
      !args.Offset(2, "offset", &offset) || !args.Offset(3, "length", &length)) {
    return info.Env().Undefined();
  }
  return Worker::Run(
      info.Env(), "fileio.fallocate",
      [=](Result& r) {
        int rc;
        do rc = fallocate(fd, m, static_cast<off_t>(offset), static_cast<off_t>(length));
        while (rc < 0 && errno == EINTR);
        if (rc < 0) Fail(r, "fallocate");
      },
      SettleVoid);
}

// ---------------------------------------------------------------------------
// writeBehind(fd, offset, length, evictOffset, evictLength)
//
// Keeps a long sequential write from filling the page cache with dirty pages: starts
// writeback of the range just written (asynchronously), then waits for an older range
// to reach the disk and drops it from the cache. Past the kernel's dirty limit a
// writer is otherwise throttled in bursts by balance_dirty_pages; this writes behind
// itself at the disk's pace instead (nbdcopy's approach; Linus's advice on
// sync_file_range). evictLength 0 skips the eviction.

Napi::Value WriteBehind(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  int fd;
  uint64_t offset, length, evictOffset, evictLength;
  if (!args.AtLeast(5, "writeBehind") || !args.Fd(0, &fd) || !args.Offset(1, "offset", &offset) ||
      !args.Offset(2, "length", &length) || !args.Offset(3, "evictOffset", &evictOffset) ||
      !args.Offset(4, "evictLength", &evictLength)) {
    return info.Env().Undefined();
  }
  return Worker::Run(
      info.Env(), "fileio.writeBehind",
      [=](Result& r) {
        int rc;
        if (length > 0) {
          do rc = sync_file_range(fd, static_cast<off_t>(offset), static_cast<off_t>(length), SYNC_FILE_RANGE_WRITE);
          while (rc < 0 && errno == EINTR);
          if (rc < 0) return Fail(r, "sync_file_range");
        }
        if (evictLength == 0) return;
        do rc = sync_file_range(fd, static_cast<off_t>(evictOffset), static_cast<off_t>(evictLength),
                                SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
        while (rc < 0 && errno == EINTR);
        if (rc < 0) return Fail(r, "sync_file_range");
        // Advice only: a failure changes nothing that matters.
        posix_fadvise(fd, static_cast<off_t>(evictOffset), static_cast<off_t>(evictLength), POSIX_FADV_DONTNEED);
      },
      SettleVoid);
}

// ---------------------------------------------------------------------------
// copyRange(srcFd, srcOffset, dstFd, dstOffset, length)
//
// Copies within the kernel (copy_file_range): no pass through user memory, and on file
// systems that share extents (XFS, btrfs) or a server that copies (NFS 4.2) no data
// moves at all. Resolves with the bytes copied, which is less than `length` only where
// the source ends. Errors come back as they are: the caller decides which ones mean
// "not here" (EXDEV, EOPNOTSUPP, ENOSYS, EINVAL) and falls back to read and write.

Napi::Value CopyRange(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  int srcFd, dstFd;
  uint64_t srcOffset, dstOffset, length;
  if (!args.AtLeast(5, "copyRange") || !args.Fd(0, &srcFd) || !args.Offset(1, "srcOffset", &srcOffset) ||
      !args.Fd(2, &dstFd) || !args.Offset(3, "dstOffset", &dstOffset) || !args.Offset(4, "length", &length)) {
    return info.Env().Undefined();
  }
  return Worker::Run(
      info.Env(), "fileio.copyRange",
      [=](Result& r) {
        uint64_t done = 0;
        while (done < length) {
          loff_t in = static_cast<loff_t>(srcOffset + done), out = static_cast<loff_t>(dstOffset + done);
          ssize_t n = copy_file_range(srcFd, &in, dstFd, &out, static_cast<size_t>(length - done), 0);
          if (n < 0) {
            if (errno == EINTR) continue;
            Fail(r, "copy_file_range");
            break;
          }
          if (n == 0) break;  // end of the source file
          done += static_cast<uint64_t>(n);
        }
        r.value = done;
      },
      SettleNumber);
}

// ---------------------------------------------------------------------------
// pipe(srcFd, pieces, pieceCount, dstFd, dstOffset, length, buffer, holes, holeCount,
//      unit, minRun, runs) -> number of zero runs
//
// One chunk of a file-to-file convert in one thread-pool job: reads the pieces
// (preadSegments' triples: source offset, length, position in the buffer), finds the
// zero runs of buffer[0, length) exactly as the core's ZeroScanner does (whole units,
// runs of at least minRun, the known holes as zero runs unread), writes the data
// between them at dstOffset, and leaves the zero runs in `runs` as [start, end) pairs
// relative to the chunk for the caller to zero or skip. Done as a read job, a scan on
// the main thread and a write job, the chunk costs two more thread-pool hand-offs and
// the main thread's time. minRun 0 scans nothing: the chunk is written whole.

constexpr size_t kZeroSpan = 64 * 1024;
const uint8_t kZeroes[kZeroSpan] = {};

bool AllZero(const uint8_t* p, uint64_t n) {
  if (n >= 8) {
    uint64_t first;
    memcpy(&first, p, 8);
    if (first != 0) return false;  // real data: rejected by one load
  }
  for (uint64_t done = 0; done < n; done += kZeroSpan) {
    size_t k = static_cast<size_t>(std::min<uint64_t>(kZeroSpan, n - done));
    if (memcmp(p + done, kZeroes, k) != 0) return false;
  }
  return true;
}

struct ZeroRuns {
  double* out;
  size_t cap;  // pairs
  size_t count = 0;
  bool overflow = false;
  // A zero run, joined to the one before when they touch (ZeroScanner.#zero).
  void Add(uint64_t start, uint64_t end) {
    if (count > 0 && out[2 * count - 1] == static_cast<double>(start)) {
      out[2 * count - 1] = static_cast<double>(end);
      return;
    }
    if (count == cap) { overflow = true; return; }
    out[2 * count] = static_cast<double>(start);
    out[2 * count + 1] = static_cast<double>(end);
    count++;
  }
};

// ZeroScanner.#scanRange: whole zero units from `from`, runs of at least minRun.
void ScanRange(const uint8_t* buf, uint64_t from, uint64_t to, uint64_t unit, uint64_t minRun, ZeroRuns& runs) {
  uint64_t pos = from;
  while (pos < to) {
    uint64_t n = std::min(unit, to - pos);
    if (n < unit || !AllZero(buf + pos, n)) {
      pos += n;
      continue;
    }
    uint64_t start = pos;
    pos += n;
    while (to - pos >= unit && AllZero(buf + pos, unit)) pos += unit;
    if (pos - start >= minRun) runs.Add(start, pos);
  }
}

bool WriteAll(int fd, const uint8_t* data, uint64_t len, uint64_t offset, Result& r) {
  uint64_t done = 0;
  while (done < len) {
    ssize_t n = pwrite(fd, data + done, len - done, static_cast<off_t>(offset + done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n < 0) Fail(r, "pwrite");
      else { r.err = EIO; r.syscall = "pwrite"; }  // cannot happen for regular files; never spin
      r.errOffset = static_cast<double>(offset + done);
      return false;
    }
    done += static_cast<uint64_t>(n);
  }
  return true;
}

struct PipeJob {
  int srcFd, dstFd;
  std::vector<uint64_t> pieces;  // triples
  std::vector<uint64_t> holes;   // pairs
  uint64_t dstOffset, length, unit, minRun;
  uint8_t* data;
  double* runs;
  size_t runCap;
};

void PipeWork(const PipeJob& j, Result& r) {
  TransferSegmentsWork(false, j.srcFd, j.data, j.pieces, r);
  if (r.err != 0) {
    r.errOffset = static_cast<double>(r.value);
    return;
  }
  ZeroRuns runs{j.runs, j.runCap};
  if (j.minRun > 0) {
    uint64_t pos = 0;
    for (size_t k = 0; k + 1 < j.holes.size(); k += 2) {
      ScanRange(j.data, pos, j.holes[k], j.unit, j.minRun, runs);
      runs.Add(j.holes[k], j.holes[k + 1]);
      pos = j.holes[k + 1];
    }
    ScanRange(j.data, pos, j.length, j.unit, j.minRun, runs);
  }
  if (runs.overflow) {  // the caller's list is sized for every unit; never write half a scan
    r.err = EOVERFLOW;
    r.syscall = "pipe";
    return;
  }
  uint64_t at = 0;
  for (size_t i = 0; i <= runs.count; i++) {
    uint64_t end = i < runs.count ? static_cast<uint64_t>(j.runs[2 * i]) : j.length;
    if (end > at && !WriteAll(j.dstFd, j.data + at, end - at, j.dstOffset + at, r)) return;
    if (i < runs.count) at = static_cast<uint64_t>(j.runs[2 * i + 1]);
  }
  r.value = runs.count;
}

// The hole list of pipe: ascending [start, end) pairs inside the chunk.
bool PipeHoles(const blockconv::Args& args, const Napi::Float64Array& list, uint64_t count, PipeJob& j) {
  j.holes.resize(2 * count);
  double last = 0;
  for (size_t i = 0; i < j.holes.size(); i += 2) {
    double a = list[i], b = list[i + 1];
    if (!(a >= last && b >= a && b <= static_cast<double>(j.length) && std::trunc(a) == a && std::trunc(b) == b)) {
      return args.RangeError("pipe: hole " + std::to_string(i / 2) + " is not ascending inside the chunk");
    }
    j.holes[i] = static_cast<uint64_t>(a);
    j.holes[i + 1] = static_cast<uint64_t>(b);
    last = b;
  }
  return true;
}

// The sizes pipe's lists and buffer must have for the chunk.
bool PipeSizes(const blockconv::Args& args, const PipeJob& j, size_t bufferBytes, size_t pieceNumbers, uint64_t pieceCount,
               size_t holeNumbers, uint64_t holeCount) {
  const char* wrong = nullptr;
  if (j.length > bufferBytes) wrong = "length exceeds the buffer";
  else if (3 * pieceCount > pieceNumbers) wrong = "pieceCount exceeds the piece list";
  else if (2 * holeCount > holeNumbers) wrong = "holeCount exceeds the hole list";
  else if (j.minRun > 0 && j.unit == 0) wrong = "unit must be positive";
  // Every unit a run of its own, plus the holes: the most runs a scan can find.
  else if (j.minRun > 0 && j.runCap < (j.length + j.unit - 1) / j.unit + holeCount + 1) wrong = "the run list is too short for the chunk";
  return wrong ? args.RangeError(std::string("pipe: ") + wrong) : true;
}

Napi::Value Pipe(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  Napi::Env env = info.Env();
  PipeJob j{};
  uint64_t pieceCount, holeCount;
  Napi::Uint8Array buf;
  Napi::Float64Array pieces, holes, runs;
  if (!args.AtLeast(12, "pipe") || !args.Fd(0, &j.srcFd) || !args.Float64Array(1, "pieces", &pieces) ||
      !args.Offset(2, "pieceCount", &pieceCount) || !args.Fd(3, &j.dstFd) ||
      !args.Offset(4, "dstOffset", &j.dstOffset) || !args.Offset(5, "length", &j.length) ||
      !args.Uint8Array(6, "buffer", &buf) || !args.Float64Array(7, "holes", &holes) ||
      !args.Offset(8, "holeCount", &holeCount) || !args.Offset(9, "unit", &j.unit) ||
      !args.Offset(10, "minRun", &j.minRun) || !args.Float64Array(11, "runs", &runs)) {
    return env.Undefined();
  }
  j.runCap = runs.ElementLength() / 2;
  if (!PipeSizes(args, j, buf.ByteLength(), pieces.ElementLength(), pieceCount, holes.ElementLength(), holeCount)) {
    return env.Undefined();
  }
  ptrdiff_t bad = CopyTriples(pieces, pieceCount, static_cast<double>(j.length), &j.pieces);
  if (bad >= 0) {
    args.RangeError("pipe: piece " + std::to_string(bad) + " is outside the chunk");
    return env.Undefined();
  }
  if (!PipeHoles(args, holes, holeCount, j)) return env.Undefined();
  if (j.minRun == 0 && holeCount > 0) {
    args.RangeError("pipe: holes need a scan (minRun > 0)");
    return env.Undefined();
  }
  blockconv::PinnedBuffer bufPin(buf), runsPin(runs);
  j.data = bufPin.data();
  j.runs = runsPin.as<double>();
  return Worker::Run(
      env, "fileio.pipe", [j = std::move(j)](Result& r) { PipeWork(j, r); }, SettleNumber, std::move(bufPin),
      std::move(runsPin));
}

// ---------------------------------------------------------------------------
// Block device ioctls

Napi::Value BlockDeviceSize(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  int fd;
  if (!args.AtLeast(1, "blockDeviceSize") || !args.Fd(0, &fd)) return info.Env().Undefined();
  return Worker::Run(
      info.Env(), "fileio.blockDeviceSize",
      [=](Result& r) {
        uint64_t size = 0;
        if (ioctl(fd, BLKGETSIZE64, &size) < 0) return Fail(r, "ioctl");
        r.value = size;
      },
      SettleNumber);
}

Napi::Value LogicalBlockSize(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  int fd;
  if (!args.AtLeast(1, "logicalBlockSize") || !args.Fd(0, &fd)) return info.Env().Undefined();
  return Worker::Run(
      info.Env(), "fileio.logicalBlockSize",
      [=](Result& r) {
        int size = 0;
        if (ioctl(fd, BLKSSZGET, &size) < 0) return Fail(r, "ioctl");
        r.value = static_cast<uint64_t>(size);
      },
      SettleNumber);
}

// BLKZEROOUT and BLKDISCARD take the same {offset, length} range argument.
Napi::Value RangeIoctl(const Napi::CallbackInfo& info, const char* fn, unsigned long request) {
  blockconv::Args args(info, kArgWords);
  int fd;
  uint64_t offset, length;
  if (!args.AtLeast(3, fn) || !args.Fd(0, &fd) || !args.Offset(1, "offset", &offset) ||
      !args.Offset(2, "length", &length)) {
    return info.Env().Undefined();
  }
  return Worker::Run(
      info.Env(), fn,
      [=](Result& r) {
        uint64_t range[2] = {offset, length};
        if (ioctl(fd, request, range) < 0) Fail(r, "ioctl");
      },
      SettleVoid);
}

Napi::Value BlockDeviceZeroOut(const Napi::CallbackInfo& info) {
  return RangeIoctl(info, "blockDeviceZeroOut", BLKZEROOUT);
}

Napi::Value BlockDeviceDiscard(const Napi::CallbackInfo& info) {
  return RangeIoctl(info, "blockDeviceDiscard", BLKDISCARD);
}

// ---------------------------------------------------------------------------
// allocAligned(size, alignment) -> Buffer over posix_memalign'd memory

void FreeAligned(Napi::Env env, uint8_t* data, size_t* size) {
  Napi::MemoryManagement::AdjustExternalMemory(env, -static_cast<int64_t>(*size));
  delete size;
  free(data);
}

Napi::Value AllocAligned(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  Napi::Env env = info.Env();
  double size, alignment;
  if (!args.AtLeast(2, "allocAligned") || !args.Number(0, "size", blockconv::kMaxSafeInteger, &size) ||
      !args.Number(1, "alignment", 1u << 30, &alignment)) {
    return env.Undefined();
  }
  const size_t align = static_cast<size_t>(alignment);
  if (align < sizeof(void*) || (align & (align - 1)) != 0) {
    args.RangeError("allocAligned: alignment must be a power of two >= " + std::to_string(sizeof(void*)));
    return env.Undefined();
  }
  const size_t n = static_cast<size_t>(size);
  void* p = nullptr;
  // Allocate at least one byte: posix_memalign(0) may return NULL, which Buffer rejects.
  int rc = posix_memalign(&p, align, n > 0 ? n : 1);
  if (rc != 0) {
    Napi::Error::New(env, "allocAligned: cannot allocate " + std::to_string(n) + " bytes: " + strerror(rc))
        .ThrowAsJavaScriptException();
    return env.Undefined();
  }
  memset(p, 0, n);  // zero-filled like Buffer.alloc: never leak old heap contents
  // The size rides along as the finalizer hint so the GC accounting can be undone.
  Napi::MemoryManagement::AdjustExternalMemory(env, static_cast<int64_t>(n));
  return Napi::Buffer<uint8_t>::New(env, static_cast<uint8_t*>(p), n, FreeAligned, new size_t(n));
}

// ---------------------------------------------------------------------------

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("blockStatus", Napi::Function::New(env, BlockStatus, "blockStatus"));
  exports.Set("extents", Napi::Function::New(env, Extents, "extents"));
  exports.Set("pwriteSegments", Napi::Function::New(env, PwriteSegments, "pwriteSegments"));
  exports.Set("preadSegments", Napi::Function::New(env, PreadSegments, "preadSegments"));
  exports.Set("pwriteScatter", Napi::Function::New(env, PwriteScatter, "pwriteScatter"));
  exports.Set("fallocate", Napi::Function::New(env, Fallocate, "fallocate"));
  exports.Set("writeBehind", Napi::Function::New(env, WriteBehind, "writeBehind"));
  exports.Set("copyRange", Napi::Function::New(env, CopyRange, "copyRange"));
  exports.Set("pipe", Napi::Function::New(env, Pipe, "pipe"));
  exports.Set("blockDeviceSize", Napi::Function::New(env, BlockDeviceSize, "blockDeviceSize"));
  exports.Set("blockDeviceZeroOut", Napi::Function::New(env, BlockDeviceZeroOut, "blockDeviceZeroOut"));
  exports.Set("blockDeviceDiscard", Napi::Function::New(env, BlockDeviceDiscard, "blockDeviceDiscard"));
  exports.Set("logicalBlockSize", Napi::Function::New(env, LogicalBlockSize, "logicalBlockSize"));
  exports.Set("allocAligned", Napi::Function::New(env, AllocAligned, "allocAligned"));

  Napi::Object c = Napi::Object::New(env);
  c.Set("FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE);
  c.Set("FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE);
  c.Set("FALLOC_FL_NO_HIDE_STALE", FALLOC_FL_NO_HIDE_STALE);
  c.Set("FALLOC_FL_COLLAPSE_RANGE", FALLOC_FL_COLLAPSE_RANGE);
  c.Set("FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE);
  c.Set("FALLOC_FL_INSERT_RANGE", FALLOC_FL_INSERT_RANGE);
  c.Set("FALLOC_FL_UNSHARE_RANGE", FALLOC_FL_UNSHARE_RANGE);
  exports.Set("constants", c);
  return exports;
}

}  // namespace

NODE_API_MODULE(fileio, Init)
