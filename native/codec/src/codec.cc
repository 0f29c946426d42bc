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

#include <napi.h>

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
// compress: the cluster does not shrink below its size; store it uncompressed.
constexpr int32_t kStoreUncompressed = -1;
constexpr uint32_t kMinClusterSize = 512;
constexpr uint32_t kMaxClusterSize = 2u << 20;
constexpr double kMaxSafeInteger = 9007199254740991.0;

// Per pool thread: created on first use, reset for every cluster.
struct ThreadCodecs {
  libdeflate_decompressor* inflater = nullptr;
  ZSTD_DCtx* zstd_d = nullptr;
  ZSTD_CCtx* zstd_c = nullptr;
  z_stream deflate_s{};
  bool deflate_ready = false;
  z_stream inflate_s{};
  bool inflate_ready = false;

  ~ThreadCodecs() {
    if (inflater) libdeflate_free_decompressor(inflater);
    if (zstd_d) ZSTD_freeDCtx(zstd_d);
    if (zstd_c) ZSTD_freeCCtx(zstd_c);
    if (deflate_ready) deflateEnd(&deflate_s);
    if (inflate_ready) inflateEnd(&inflate_s);
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

// zlib's verdict, used when libdeflate refuses a stream: QEMU inflates with zlib,
// Z_FINISH, and accepts Z_BUF_ERROR once the cluster is full (no final block needed).
// Stricter than QEMU in one way: a stream with more output than a cluster is refused.
bool InflateWithZlib(const uint8_t* in, size_t in_len, uint8_t* out, size_t size, std::string* why, const char** code) {
  z_stream& s = codecs.inflate_s;
  if (!codecs.inflate_ready) {
    if (inflateInit2(&s, -15) != Z_OK) {
      *code = "ENOMEM";
      *why = "zlib: cannot allocate an inflate state";
      return false;
    }
    codecs.inflate_ready = true;
  } else {
    inflateReset(&s);
  }
  s.next_in = const_cast<Bytef*>(in);
  // A stream never needs more input than this for a cluster of at most 2 MiB.
  s.avail_in = static_cast<uInt>(in_len < (1u << 30) ? in_len : (1u << 30));
  s.next_out = out;
  s.avail_out = static_cast<uInt>(size);
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
    *why = "decompresses to more than " + std::to_string(size) + " bytes";
    return false;
  }
  return true;
}

bool InflateCluster(const uint8_t* in, size_t in_len, uint8_t* out, size_t size, std::string* why, const char** code) {
  if (!codecs.inflater && !(codecs.inflater = libdeflate_alloc_decompressor())) {
    *code = "ENOMEM";
    *why = "cannot allocate a libdeflate decompressor";
    return false;
  }
  size_t used = 0, produced = 0;
  switch (libdeflate_deflate_decompress_ex(codecs.inflater, in, in_len, out, size, &used, &produced)) {
    case LIBDEFLATE_SUCCESS:
      if (produced == size) return true;
      *why = Sizes("decompresses to ", produced, size);
      return false;
    case LIBDEFLATE_INSUFFICIENT_SPACE:
      *why = "decompresses to more than " + std::to_string(size) + " bytes";
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
      *why = "decompresses to more than " + std::to_string(size) + " bytes";
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
  BatchWorker(Napi::Env env, const char* name, bool compress, int kind, size_t size, size_t first,
              std::vector<Span> spans, Napi::Uint8Array input, Napi::Uint8Array output, Napi::Int32Array lengths)
      : Napi::AsyncWorker(env, name),
        deferred_(Napi::Promise::Deferred::New(env)),
        compress_(compress),
        kind_(kind),
        size_(size),
        first_(first),
        spans_(std::move(spans)),
        in_(input.Data()),
        out_(output.Data()),
        lengths_(lengths.IsEmpty() ? nullptr : lengths.Data()),
        input_ref_(Napi::Persistent(input)),
        output_ref_(Napi::Persistent(output)) {
    if (!lengths.IsEmpty()) lengths_ref_ = Napi::Persistent(lengths);
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

 protected:
  void Execute() override {
    std::string why;
    const char* code = "ECORRUPT";
    for (size_t i = 0; i < spans_.size(); i++) {
      const Span& s = spans_[i];
      if (compress_) {
        int64_t n = kind_ == kZlib ? DeflateCluster(in_ + s.in, size_, out_ + s.out, &why)
                                   : ZstdCluster(in_ + s.in, size_, out_ + s.out, &why);
        if (n == -2) {
          failure_.Set(first_ + i, "EIO", std::move(why));
          return;
        }
        lengths_[i] = static_cast<int32_t>(n);
      } else {
        bool ok = kind_ == kZlib ? InflateCluster(in_ + s.in, s.in_len, out_ + s.out, size_, &why, &code)
                                 : UnzstdCluster(in_ + s.in, s.in_len, out_ + s.out, size_, &why, &code);
        if (!ok) {
          failure_.Set(first_ + i, code, std::move(why));
          return;
        }
      }
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
  Napi::Promise::Deferred deferred_;
  const bool compress_;
  const int kind_;
  const size_t size_;
  const size_t first_;
  const std::vector<Span> spans_;
  const uint8_t* in_;
  uint8_t* out_;
  int32_t* lengths_;
  // The buffers stay referenced while the pool thread uses their memory.
  Napi::Reference<Napi::Uint8Array> input_ref_;
  Napi::Reference<Napi::Uint8Array> output_ref_;
  Napi::Reference<Napi::Int32Array> lengths_ref_;
  Failure failure_;
};

// ---------------------------------------------------------------------------
// Arguments. Exceptions are disabled: helpers throw a pending JS exception and
// return false.

bool Throw(Napi::Env env, bool range, const std::string& message) {
  if (range) Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
  else Napi::TypeError::New(env, message).ThrowAsJavaScriptException();
  return false;
}

bool ArgUint(const Napi::CallbackInfo& info, size_t i, const char* name, double max, double* out) {
  if (!info[i].IsNumber()) return Throw(info.Env(), false, std::string("\"") + name + "\" must be a number");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(v) || std::trunc(v) != v || v < 0 || v > max) {
    return Throw(info.Env(), true, std::string("\"") + name + "\" is out of range");
  }
  *out = v;
  return true;
}

bool ArgBytes(const Napi::CallbackInfo& info, size_t i, const char* name, Napi::Uint8Array* out) {
  if (!info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    return Throw(info.Env(), false, std::string("\"") + name + "\" must be a Uint8Array");
  }
  *out = info[i].As<Napi::Uint8Array>();
  return true;
}

bool IsUint(double v) { return v >= 0 && v <= kMaxSafeInteger && std::trunc(v) == v; }

// Shared arguments: (kind, clusterSize, input, spans: Float64Array, first, count, output).
// `stride` numbers per cluster in spans.
bool CommonArgs(const Napi::CallbackInfo& info, size_t stride, int* kind, size_t* size, Napi::Uint8Array* input,
                Napi::Float64Array* spans, size_t* first, size_t* count, Napi::Uint8Array* output) {
  Napi::Env env = info.Env();
  double k, cs, f, c;
  if (info.Length() < 7) return Throw(env, false, "expected 7 arguments or more");
  if (!ArgUint(info, 0, "kind", 1, &k) || !ArgUint(info, 1, "clusterSize", kMaxClusterSize, &cs) ||
      !ArgBytes(info, 2, "input", input) || !ArgUint(info, 4, "first", kMaxSafeInteger, &f) ||
      !ArgUint(info, 5, "count", kMaxSafeInteger, &c) || !ArgBytes(info, 6, "output", output)) {
    return false;
  }
  if (cs < kMinClusterSize || (static_cast<uint32_t>(cs) & (static_cast<uint32_t>(cs) - 1)) != 0) {
    return Throw(env, true, "\"clusterSize\" must be a power of two from 512 to 2 MiB");
  }
  if (!info[3].IsTypedArray() || info[3].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    return Throw(env, false, "\"spans\" must be a Float64Array");
  }
  *spans = info[3].As<Napi::Float64Array>();
  if ((f + c) * stride > static_cast<double>(spans->ElementLength())) {
    return Throw(env, true, "first + count exceeds the spans given");
  }
  *kind = static_cast<int>(k);
  *size = static_cast<size_t>(cs);
  *first = static_cast<size_t>(f);
  *count = static_cast<size_t>(c);
  return true;
}

// decompress(kind, clusterSize, input, spans, first, count, output): spans holds
// (input offset, input length, output offset) per cluster.
Napi::Value Decompress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int kind;
  size_t size, first, count;
  Napi::Uint8Array input, output;
  Napi::Float64Array list;
  if (!CommonArgs(info, 3, &kind, &size, &input, &list, &first, &count, &output)) return env.Undefined();
  const double in_bytes = static_cast<double>(input.ByteLength());
  const double out_bytes = static_cast<double>(output.ByteLength());
  std::vector<Span> spans(count);
  for (size_t i = 0; i < count; i++) {
    const size_t at = 3 * (first + i);
    double in = list[at], len = list[at + 1], out = list[at + 2];
    if (!IsUint(in) || !IsUint(len) || !IsUint(out) || in + len > in_bytes || out + size > out_bytes) {
      Throw(env, true, "decompress: cluster " + std::to_string(first + i) + " lies outside its buffers");
      return env.Undefined();
    }
    spans[i] = {static_cast<uint64_t>(in), static_cast<uint64_t>(len), static_cast<uint64_t>(out)};
  }
  auto* w = new BatchWorker(env, "codec.decompress", false, kind, size, first, std::move(spans), input, output,
                            Napi::Int32Array());
  Napi::Promise promise = w->Promise();
  w->Queue();  // deletes itself once settled
  return promise;
}

// compress(kind, clusterSize, input, spans, first, count, output, lengths): spans
// holds (input offset, output offset) per cluster; each input is one cluster, each
// output slot clusterSize - 1 bytes; lengths[first + i] receives the result.
Napi::Value Compress(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int kind;
  size_t size, first, count;
  Napi::Uint8Array input, output;
  Napi::Float64Array list;
  if (!CommonArgs(info, 2, &kind, &size, &input, &list, &first, &count, &output)) return env.Undefined();
  if (info.Length() < 8 || !info[7].IsTypedArray() || info[7].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array) {
    Throw(env, false, "\"lengths\" must be an Int32Array");
    return env.Undefined();
  }
  Napi::Int32Array lengths = info[7].As<Napi::Int32Array>();
  if (first + count > lengths.ElementLength()) {
    Throw(env, true, "first + count exceeds the lengths array");
    return env.Undefined();
  }
  const double in_bytes = static_cast<double>(input.ByteLength());
  const double out_bytes = static_cast<double>(output.ByteLength());
  std::vector<Span> spans(count);
  for (size_t i = 0; i < count; i++) {
    const size_t at = 2 * (first + i);
    double in = list[at], out = list[at + 1];
    if (!IsUint(in) || !IsUint(out) || in + size > in_bytes || out + size - 1 > out_bytes) {
      Throw(env, true, "compress: cluster " + std::to_string(first + i) + " lies outside its buffers");
      return env.Undefined();
    }
    spans[i] = {static_cast<uint64_t>(in), 0, static_cast<uint64_t>(out)};
  }
  // The worker writes lengths from index 0: hand it the part of the array for this job.
  Napi::Int32Array part = Napi::Int32Array::New(env, count, lengths.ArrayBuffer(),
                                                lengths.ByteOffset() + first * sizeof(int32_t));
  auto* w = new BatchWorker(env, "codec.compress", true, kind, size, first, std::move(spans), input, output, part);
  Napi::Promise promise = w->Promise();
  w->Queue();
  return promise;
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
