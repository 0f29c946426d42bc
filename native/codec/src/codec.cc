// Batch (de)compression of qcow2 clusters on the libuv thread pool. One call is one
// thread-pool job (Napi::AsyncWorker) over a run of clusters, reading from and writing
// into buffers the caller owns: no allocation per cluster. Codec contexts live per
// pool thread and are reset between clusters, so a job allocates nothing either.
//
// Formats follow QEMU's block/qcow2-threads.c:
// - zlib: raw deflate. Decompression must produce exactly one cluster; the input may
//   carry bytes after the stream (descriptors are sector-rounded). libdeflate does the
//   work; when it refuses a stream (it needs a final block), zlib decides as QEMU does,
//   which accepts a stream that fills the cluster without one. Compression is zlib's
//   deflateInit2(Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9): QEMU inflates with a 4 KiB
//   window, so libdeflate (32 KiB matches) must not compress.
// - zstd: one frame per cluster, decompressed to exactly one cluster (trailing bytes
//   after the frame ignored); compression is one ZSTD_compressStream2(ZSTD_e_end) call
//   with default parameters.
// A cluster is stored compressed only when it fits in cluster_size - 1 bytes (QEMU's
// qcow2_co_pwritev_compressed_task); otherwise compress reports kStoreUncompressed.
//
// Besides qcow2's: rfc1950, for other formats' grains (a VMDK streamOptimized grain is
// one): a zlib stream (RFC 1950: header, deflate data, adler32) that decompresses to at
// most a cluster, the last grain of an image often less; trailing bytes are ignored and
// the length is reported. libdeflate does the work; when it refuses a stream, zlib
// gives the verdict and its reason (a wrong adler32 is zlib's "incorrect data check").
// Decompression only.

#include <napi.h>

#include <blockconv/napi_args.h>
#include <blockconv/pinned_buffer.h>

#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include <stdint.h>
#include <string.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr int kZlib = 0;
constexpr int kZstd = 1;
constexpr int kRfc1950 = 2;  // decompression only
// compress: the cluster does not shrink below its size; store it uncompressed.
constexpr int32_t kStoreUncompressed = -1;
constexpr uint32_t kMinClusterSize = 512;
constexpr uint32_t kMaxClusterSize = 2u << 20;
// Argument errors in the addon's own short words ("clusterSize" is out of range).
constexpr blockconv::ArgWords kArgWords = blockconv::ArgWords::kShort;

// Per pool thread: created on first use, reset for every cluster.
struct ThreadCodecs {
  libdeflate_decompressor* inflater = nullptr;
  ZSTD_DCtx* zstd_d = nullptr;
  ZSTD_CCtx* zstd_c = nullptr;
  z_stream deflate_s{};
  bool deflate_ready = false;
  struct Inflate {
    z_stream s{};
    bool ready = false;
  };
  Inflate raw_inflate;   // zlib: raw deflate (windowBits -15)
  Inflate zlib_inflate;  // rfc1950: the zlib wrapper (windowBits 15)

  ~ThreadCodecs() {
    if (inflater) libdeflate_free_decompressor(inflater);
    if (zstd_d) ZSTD_freeDCtx(zstd_d);
    if (zstd_c) ZSTD_freeCCtx(zstd_c);
    if (deflate_ready) deflateEnd(&deflate_s);
    if (raw_inflate.ready) inflateEnd(&raw_inflate.s);
    if (zlib_inflate.ready) inflateEnd(&zlib_inflate.s);
  }
};

thread_local ThreadCodecs codecs;

// What went wrong with a cluster: its index in the batch, a code and a reason.
struct Failure {
  bool failed = false;
  size_t index = 0;
  const char* code = "ECORRUPT";
  std::string reason;

  void Set(size_t i, const char* c, std::string why) {
    failed = true;
    index = i;
    code = c;
    reason = std::move(why);
  }
};

std::string Sizes(const char* what, size_t got, size_t want) {
  return std::string(what) + std::to_string(got) + " bytes, expected " + std::to_string(want);
}

std::string MoreThan(size_t size) { return "decompresses to more than " + std::to_string(size) + " bytes"; }

// This thread's inflate state, reset and pointed at `in` and `out`; null (with `why`) when
// zlib cannot allocate one.
z_stream* InflateState(ThreadCodecs::Inflate& st, int windowBits, const uint8_t* in, size_t in_len, uint8_t* out,
                       size_t size, std::string* why, const char** code) {
  if (!st.ready) {
    if (inflateInit2(&st.s, windowBits) != Z_OK) {
      *code = "ENOMEM";
      *why = "zlib: cannot allocate an inflate state";
      return nullptr;
    }
    st.ready = true;
  } else {
    inflateReset(&st.s);
  }
  st.s.next_in = const_cast<Bytef*>(in);
  // A stream never needs more input than this for a cluster of at most 2 MiB.
  st.s.avail_in = static_cast<uInt>(in_len < (1u << 30) ? in_len : (1u << 30));
  st.s.next_out = out;
  st.s.avail_out = static_cast<uInt>(size);
  return &st.s;
}

// zlib's verdict, used when libdeflate refuses a stream: QEMU inflates with zlib,
// Z_FINISH, and accepts Z_BUF_ERROR once the cluster is full (no final block needed).
// Stricter than QEMU in one way: a stream with more output than a cluster is refused.
bool InflateWithZlib(const uint8_t* in, size_t in_len, uint8_t* out, size_t size, std::string* why, const char** code) {
  z_stream* z = InflateState(codecs.raw_inflate, -15, in, in_len, out, size, why, code);
  if (!z) return false;
  z_stream& s = *z;
  int ret = inflate(&s, Z_FINISH);
  if (ret == Z_STREAM_END) {
    if (s.avail_out == 0) return true;
    *why = Sizes("decompresses to ", size - s.avail_out, size);
    return false;
  }
  if (ret == Z_MEM_ERROR) {
    *code = "ENOMEM";
    *why = "zlib: out of memory";
    return false;
  }
  if (ret != Z_OK && ret != Z_BUF_ERROR) {
    *why = s.msg ? s.msg : "invalid deflate stream";
    return false;
  }
  if (s.avail_out != 0) {
    *why = "truncated stream: " + Sizes("decompresses to ", size - s.avail_out, size);
    return false;
  }
  // The cluster is full: more output would mean the stream is longer than a cluster.
  uint8_t probe;
  s.next_out = &probe;
  s.avail_out = 1;
  inflate(&s, Z_SYNC_FLUSH);
  if (s.avail_out == 0) {
    *why = MoreThan(size);
    return false;
  }
  return true;
}

bool Inflater(std::string* why, const char** code) {
  if (codecs.inflater || (codecs.inflater = libdeflate_alloc_decompressor())) return true;
  *code = "ENOMEM";
  *why = "cannot allocate a libdeflate decompressor";
  return false;
}

// The reason zlib gives for a zlib stream it refuses.
std::string ZlibStreamError(const z_stream& s, int ret) {
  if (ret == Z_NEED_DICT) return "the stream needs a preset dictionary (FDICT), which is not given";
  if (s.msg && strcmp(s.msg, "incorrect data check") == 0) return "incorrect data check: the adler32 does not match the data";
  return s.msg ? s.msg : "invalid zlib stream";
}

// zlib's verdict on a zlib stream (rfc1950) that libdeflate refused, with zlib's reason.
bool ZlibStreamWithZlib(const uint8_t* in, size_t in_len, uint8_t* out, size_t size, size_t* produced, std::string* why,
                        const char** code) {
  z_stream* z = InflateState(codecs.zlib_inflate, 15, in, in_len, out, size, why, code);
  if (!z) return false;
  int ret = inflate(z, Z_FINISH);
  *produced = size - z->avail_out;
  if (ret == Z_BUF_ERROR && z->avail_out == 0) {
    // The output is full: the stream may end here (its trailer unread yet) or go on.
    uint8_t probe;
    z->next_out = &probe;
    z->avail_out = 1;
    ret = inflate(z, Z_SYNC_FLUSH);
    if (z->avail_out == 0) {
      *why = MoreThan(size);
      return false;
    }
  }
  if (ret == Z_STREAM_END) return true;
  if (ret == Z_MEM_ERROR) {
    *code = "ENOMEM";
    *why = "zlib: out of memory";
    return false;
  }
  if (ret == Z_OK || ret == Z_BUF_ERROR) {
    *why = "truncated stream: the input ends after " + std::to_string(*produced) + " bytes of output";
  } else {
    *why = ZlibStreamError(*z, ret);
  }
  return false;
}

// rfc1950: a zlib stream of at most `size` bytes of output; `produced` receives its length.
bool InflateZlibStream(const uint8_t* in, size_t in_len, uint8_t* out, size_t size, size_t* produced, std::string* why,
                       const char** code) {
  if (!Inflater(why, code)) return false;
  size_t used = 0;
  if (libdeflate_zlib_decompress_ex(codecs.inflater, in, in_len, out, size, &used, produced) == LIBDEFLATE_SUCCESS) {
    return true;
  }
  // Every refusal goes to zlib, LIBDEFLATE_INSUFFICIENT_SPACE too: libdeflate says so of
  // a stream that fills the slot and lacks (part of) its adler32, which is truncated.
  return ZlibStreamWithZlib(in, in_len, out, size, produced, why, code);
}

bool InflateCluster(const uint8_t* in, size_t in_len, uint8_t* out, size_t size, std::string* why, const char** code) {
  if (!Inflater(why, code)) return false;
  size_t used = 0, produced = 0;
  switch (libdeflate_deflate_decompress_ex(codecs.inflater, in, in_len, out, size, &used, &produced)) {
    case LIBDEFLATE_SUCCESS:
      if (produced == size) return true;
      *why = Sizes("decompresses to ", produced, size);
      return false;
    case LIBDEFLATE_INSUFFICIENT_SPACE:
      *why = MoreThan(size);
      return false;
    default:
      return InflateWithZlib(in, in_len, out, size, why, code);
  }
}

bool UnzstdCluster(const uint8_t* in, size_t in_len, uint8_t* out, size_t size, std::string* why, const char** code) {
  if (!codecs.zstd_d && !(codecs.zstd_d = ZSTD_createDCtx())) {
    *code = "ENOMEM";
    *why = "cannot allocate a zstd decompression context";
    return false;
  }
  // No window limit is needed here: one-shot decompression writes straight into the
  // cluster and allocates no window buffer, whatever the frame header says.
  unsigned long long content = ZSTD_getFrameContentSize(in, in_len);
  if (content == ZSTD_CONTENTSIZE_ERROR) {
    *why = "not a zstd frame, or its header is truncated";
    return false;
  }
  if (ZSTD_getDictID_fromFrame(in, in_len) != 0) {
    *why = "frame needs a dictionary";
    return false;
  }
  if (content != ZSTD_CONTENTSIZE_UNKNOWN && content != size) {
    *why = "frame content size " + std::to_string(content) + " is not the cluster size " + std::to_string(size);
    return false;
  }
  size_t frame = ZSTD_findFrameCompressedSize(in, in_len);
  if (ZSTD_isError(frame)) {
    *why = ZSTD_getErrorCode(frame) == ZSTD_error_srcSize_wrong ? "frame truncated" : ZSTD_getErrorName(frame);
    return false;
  }
  size_t got = ZSTD_decompressDCtx(codecs.zstd_d, out, size, in, frame);
  if (ZSTD_isError(got)) {
    if (ZSTD_getErrorCode(got) == ZSTD_error_dstSize_tooSmall) {
      *why = MoreThan(size);
    } else {
      *why = ZSTD_getErrorName(got);
    }
    return false;
  }
  if (got != size) {
    *why = Sizes("decompresses to ", got, size);
    return false;
  }
  return true;
}

// Compressed length in [1, size - 1], kStoreUncompressed, or -2 with `why` on failure.
int64_t DeflateCluster(const uint8_t* in, size_t size, uint8_t* out, std::string* why) {
  z_stream& s = codecs.deflate_s;
  if (!codecs.deflate_ready) {
    if (deflateInit2(&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK) {
      *why = "zlib: cannot allocate a deflate state";
      return -2;
    }
    codecs.deflate_ready = true;
  } else {
    deflateReset(&s);  // the same stream as a fresh deflateInit2 would make
  }
  const size_t cap = size - 1;
  s.next_in = const_cast<Bytef*>(in);
  s.avail_in = static_cast<uInt>(size);
  s.next_out = out;
  s.avail_out = static_cast<uInt>(cap);
  int ret = deflate(&s, Z_FINISH);
  if (ret == Z_STREAM_END) return static_cast<int64_t>(cap - s.avail_out);
  if (ret == Z_OK) return kStoreUncompressed;  // out of room: not smaller than the cluster
  *why = std::string("zlib: deflate failed (") + (s.msg ? s.msg : std::to_string(ret)) + ")";
  return -2;
}

int64_t ZstdCluster(const uint8_t* in, size_t size, uint8_t* out, std::string* why) {
  if (!codecs.zstd_c && !(codecs.zstd_c = ZSTD_createCCtx())) {
    *why = "cannot allocate a zstd compression context";
    return -2;
  }
  // Default parameters, as the fresh context QEMU creates per cluster.
  ZSTD_CCtx_reset(codecs.zstd_c, ZSTD_reset_session_and_parameters);
  ZSTD_outBuffer output = {out, size - 1, 0};
  ZSTD_inBuffer input = {in, size, 0};
  size_t ret = ZSTD_compressStream2(codecs.zstd_c, &output, &input, ZSTD_e_end);
  if (ret == 0) return static_cast<int64_t>(output.pos);
  // Not finished (bytes left to flush) or out of room: not smaller than the cluster.
  if (!ZSTD_isError(ret) || ZSTD_getErrorCode(ret) == ZSTD_error_dstSize_tooSmall) return kStoreUncompressed;
  *why = std::string("zstd: ") + ZSTD_getErrorName(ret);
  return -2;
}

// ---------------------------------------------------------------------------
// Jobs

struct Span {
  uint64_t in;
  uint64_t in_len;  // decompress only
  uint64_t out;
};

class BatchWorker : public Napi::AsyncWorker {
 public:
  // `lengths`: compress fills it always, decompress when given (else an empty pin).
  BatchWorker(Napi::Env env, const char* name, bool compress, int kind, size_t size, size_t first,
              std::vector<Span> spans, blockconv::PinnedBuffer input, blockconv::PinnedBuffer output,
              blockconv::PinnedBuffer lengths)
      : Napi::AsyncWorker(env, name),
        deferred_(Napi::Promise::Deferred::New(env)),
        compress_(compress),
        kind_(kind),
        size_(size),
        first_(first),
        spans_(std::move(spans)),
        input_(std::move(input)),
        output_(std::move(output)),
        lengths_(std::move(lengths)) {}

  // Queues the job; it deletes itself once settled.
  Napi::Promise Start() {
    Napi::Promise promise = deferred_.Promise();
    Queue();
    return promise;
  }

 protected:
  void Execute() override {
    for (size_t i = 0; i < spans_.size() && !failure_.failed; i++) {
      if (compress_) CompressOne(i);
      else DecompressOne(i);
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    if (!failure_.failed) {
      deferred_.Resolve(env.Undefined());
      return;
    }
    Napi::Error error = Napi::Error::New(env, "cluster " + std::to_string(failure_.index) + ": " + failure_.reason);
    Napi::Object obj = error.Value();
    obj.Set("code", Napi::String::New(env, failure_.code));
    obj.Set("index", Napi::Number::New(env, static_cast<double>(failure_.index)));
    obj.Set("reason", Napi::String::New(env, failure_.reason));
    deferred_.Reject(obj);
  }

 private:
  void CompressOne(size_t i) {
    const Span& s = spans_[i];
    const uint8_t* in = input_.data() + s.in;
    uint8_t* out = output_.data() + s.out;
    std::string why;
    int64_t n = kind_ == kZlib ? DeflateCluster(in, size_, out, &why) : ZstdCluster(in, size_, out, &why);
    if (n == -2) failure_.Set(first_ + i, "EIO", std::move(why));
    else lengths_.as<int32_t>()[i] = static_cast<int32_t>(n);
  }

  void DecompressOne(size_t i) {
    const Span& s = spans_[i];
    const uint8_t* in = input_.data() + s.in;
    uint8_t* out = output_.data() + s.out;
    std::string why;
    const char* code = "ECORRUPT";
    size_t produced = size_;  // zlib and zstd: exactly a cluster, or a failure
    bool ok;
    switch (kind_) {
      case kZlib: ok = InflateCluster(in, s.in_len, out, size_, &why, &code); break;
      case kZstd: ok = UnzstdCluster(in, s.in_len, out, size_, &why, &code); break;
      default: ok = InflateZlibStream(in, s.in_len, out, size_, &produced, &why, &code); break;
    }
    if (!ok) failure_.Set(first_ + i, code, std::move(why));
    else if (lengths_.data()) lengths_.as<int32_t>()[i] = static_cast<int32_t>(produced);
  }

  Napi::Promise::Deferred deferred_;
  const bool compress_;
  const int kind_;
  const size_t size_;
  const size_t first_;
  const std::vector<Span> spans_;
  // The caller's buffers, pinned while the pool thread uses their memory.
  const blockconv::PinnedBuffer input_;
  const blockconv::PinnedBuffer output_;
  const blockconv::PinnedBuffer lengths_;
  Failure failure_;
};

// ---------------------------------------------------------------------------
// Arguments

bool IsUint(double v) { return v >= 0 && v <= blockconv::kMaxSafeInteger && std::trunc(v) == v; }

// What decompress and compress both take: (kind, clusterSize, input, spans, first,
// count, output), `stride` numbers per cluster in spans.
struct Batch {
  int kind;
  size_t size, first, count;
  Napi::Uint8Array input, output;
  Napi::Float64Array spans;
};

bool BatchArgs(const blockconv::Args& args, size_t stride, int maxKind, Batch* b) {
  if (!args.AtLeast(7, "")) return false;
  double cs;
  if (!args.Integer(0, "kind", maxKind, &b->kind) || !args.Number(1, "clusterSize", kMaxClusterSize, &cs) ||
      !args.Uint8Array(2, "input", &b->input) || !args.Integer(4, "first", blockconv::kMaxSafeInteger, &b->first) ||
      !args.Integer(5, "count", blockconv::kMaxSafeInteger, &b->count) || !args.Uint8Array(6, "output", &b->output)) {
    return false;
  }
  if (cs < kMinClusterSize || (static_cast<uint32_t>(cs) & (static_cast<uint32_t>(cs) - 1)) != 0) {
    return args.RangeError("\"clusterSize\" must be a power of two from 512 to 2 MiB");
  }
  b->size = static_cast<size_t>(cs);
  if (!args.Float64Array(3, "spans", &b->spans)) return false;
  if (static_cast<double>(b->first + b->count) * stride > static_cast<double>(b->spans.ElementLength())) {
    return args.RangeError("first + count exceeds the spans given");
  }
  return true;
}

// The part of `lengths` for the job's clusters: the worker writes from index 0.
bool LengthsPart(const blockconv::Args& args, const Napi::Int32Array& lengths, const Batch& b, Napi::Int32Array* part) {
  if (b.first + b.count > lengths.ElementLength()) return args.RangeError("first + count exceeds the lengths array");
  *part = Napi::Int32Array::New(args.Env(), b.count, lengths.ArrayBuffer(), lengths.ByteOffset() + b.first * sizeof(int32_t));
  return true;
}

// decompress(kind, clusterSize, input, spans, first, count, output, lengths?): spans
// holds (input offset, input length, output offset) per cluster; lengths[first + i]
// receives the length decompressed (needed for rfc1950, whose output may be short).
Napi::Value Decompress(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  Napi::Env env = info.Env();
  Batch b;
  Napi::Int32Array lengths, part;
  if (!BatchArgs(args, 3, kRfc1950, &b)) return env.Undefined();
  if ((b.kind == kRfc1950 || !args[7].IsUndefined()) &&
      (!args.Int32Array(7, "lengths", &lengths) || !LengthsPart(args, lengths, b, &part))) {
    return env.Undefined();
  }
  const double in_bytes = static_cast<double>(b.input.ByteLength());
  const double out_bytes = static_cast<double>(b.output.ByteLength());
  std::vector<Span> spans(b.count);
  for (size_t i = 0; i < b.count; i++) {
    const size_t at = 3 * (b.first + i);
    double in = b.spans[at], len = b.spans[at + 1], out = b.spans[at + 2];
    if (!IsUint(in) || !IsUint(len) || !IsUint(out) || in + len > in_bytes || out + b.size > out_bytes) {
      args.RangeError("decompress: cluster " + std::to_string(b.first + i) + " lies outside its buffers");
      return env.Undefined();
    }
    spans[i] = {static_cast<uint64_t>(in), static_cast<uint64_t>(len), static_cast<uint64_t>(out)};
  }
  auto* w = new BatchWorker(env, "codec.decompress", false, b.kind, b.size, b.first, std::move(spans),
                            blockconv::PinnedBuffer(b.input), blockconv::PinnedBuffer(b.output),
                            part.IsEmpty() ? blockconv::PinnedBuffer() : blockconv::PinnedBuffer(part));
  return w->Start();
}

// compress(kind, clusterSize, input, spans, first, count, output, lengths): spans
// holds (input offset, output offset) per cluster; each input is one cluster, each
// output slot clusterSize - 1 bytes; lengths[first + i] receives the result.
Napi::Value Compress(const Napi::CallbackInfo& info) {
  blockconv::Args args(info, kArgWords);
  Napi::Env env = info.Env();
  Batch b;
  Napi::Int32Array lengths, part;
  if (!BatchArgs(args, 2, kZstd, &b) || !args.Int32Array(7, "lengths", &lengths) || !LengthsPart(args, lengths, b, &part)) {
    return env.Undefined();
  }
  const double in_bytes = static_cast<double>(b.input.ByteLength());
  const double out_bytes = static_cast<double>(b.output.ByteLength());
  std::vector<Span> spans(b.count);
  for (size_t i = 0; i < b.count; i++) {
    const size_t at = 2 * (b.first + i);
    double in = b.spans[at], out = b.spans[at + 1];
    if (!IsUint(in) || !IsUint(out) || in + b.size > in_bytes || out + b.size - 1 > out_bytes) {
      args.RangeError("compress: cluster " + std::to_string(b.first + i) + " lies outside its buffers");
      return env.Undefined();
    }
    spans[i] = {static_cast<uint64_t>(in), 0, static_cast<uint64_t>(out)};
  }
  auto* w = new BatchWorker(env, "codec.compress", true, b.kind, b.size, b.first, std::move(spans),
                            blockconv::PinnedBuffer(b.input), blockconv::PinnedBuffer(b.output), blockconv::PinnedBuffer(part));
  return w->Start();
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("decompress", Napi::Function::New(env, Decompress, "decompress"));
  exports.Set("compress", Napi::Function::New(env, Compress, "compress"));
  Napi::Object versions = Napi::Object::New(env);
  versions.Set("libdeflate", Napi::String::New(env, LIBDEFLATE_VERSION_STRING));
  versions.Set("zstd", Napi::String::New(env, ZSTD_versionString()));
  versions.Set("zlib", Napi::String::New(env, zlibVersion()));
  exports.Set("versions", versions);
  exports.Set("STORE_UNCOMPRESSED", Napi::Number::New(env, kStoreUncompressed));
  return exports;
}

}  // namespace

NODE_API_MODULE(codec, Init)
