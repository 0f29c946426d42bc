// Node binding over libnfs's asynchronous API (libnfs 4.0). One NfsContext per
// connection; libnfs's socket is driven from the Node event loop the way QEMU's
// block/nfs.c drives it from its AioContext:
//  - a uv_poll_t on nfs_get_fd() (blockconv::ServiceLoop, @blockconv/napi-common), armed
//    with nfs_which_events() after every submit and every nfs_service() call, and re-armed only when the mask changes (POLLOUT stays
//    armed only while libnfs has output queued: level-triggered polls busy-loop otherwise);
//  - a ~100 ms tick (the ServiceLoop's) calling nfs_service(ctx, 0) so libnfs's RPC timeouts fire,
//    and checking the stall timeout: with `stallMs`, requests fail only when the socket
//    has moved no byte (TCP_INFO's counters, blockconv::SocketProgress) for that long
//    while they wait.
//    libnfs's own timeout counts from when a request is queued, so a slow link with many
//    requests queued behind each other trips it although every byte is moving;
//  - the poll handle is re-created when the fd, or the socket behind it, changes
//    (mount hops portmapper -> mountd -> nfsd; reconnects dup2 a new socket onto the fd).
// Completions run inside nfs_service(); they only settle promises. JS continuations run
// when the callback scope around nfs_service() closes, i.e. after libnfs has returned,
// so nothing re-enters libnfs from inside its own callback.
// No synchronous libnfs call is ever made.

#include <napi.h>

#include <blockconv/errno_name.h>
#include <blockconv/napi_args.h>
#include <blockconv/pinned_buffer.h>
#include <blockconv/service_loop.h>
#include <blockconv/socket_progress.h>

#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <string>
#include <unordered_map>

extern "C" {
#include <nfsc/libnfs.h>
}

namespace {

using blockconv::kMaxSafeInteger;
constexpr blockconv::ArgWords kArgWords = blockconv::ArgWords::kNode;

// An Error carrying libnfs's text, `code` (errno name, e.g. 'ENOENT') and `errno` (positive).
Napi::Value NfsError(Napi::Env env, int err, const std::string& text) {
  if (err <= 0) err = EIO;
  std::string msg = text.empty() ? strerror(err) : text;
  Napi::Error e = Napi::Error::New(env, msg);
  Napi::Object o = e.Value();
  o.Set("code", Napi::String::New(env, blockconv::ErrnoName(err)));
  o.Set("errno", Napi::Number::New(env, err));
  return o;
}

enum class Op { Mount, Umount, Open, Pread, Pwrite, Fstat, Ftruncate, Fsync, Close };

class NfsContext;

// One request in flight. The caller's buffer (pread, pwrite) stays pinned until the callback.
struct Request {
  NfsContext* ctx;
  Op op;
  Napi::Promise::Deferred deferred;
  blockconv::PinnedBuffer buffer;
  Request(NfsContext* c, Op o, Napi::Env env) : ctx(c), op(o), deferred(Napi::Promise::Deferred::New(env)) {}
};

class NfsContext : public Napi::ObjectWrap<NfsContext> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "NfsContext", {
      InstanceMethod<&NfsContext::Mount>("mount"),
      InstanceMethod<&NfsContext::Umount>("umount"),
      InstanceMethod<&NfsContext::Open>("open"),
      InstanceMethod<&NfsContext::Pread>("pread"),
      InstanceMethod<&NfsContext::Pwrite>("pwrite"),
      InstanceMethod<&NfsContext::Fstat>("fstat"),
      InstanceMethod<&NfsContext::Ftruncate>("ftruncate"),
      InstanceMethod<&NfsContext::Fsync>("fsync"),
      InstanceMethod<&NfsContext::Close>("close"),
      InstanceMethod<&NfsContext::Destroy>("destroy"),
      InstanceAccessor<&NfsContext::GetReadMax>("readMax"),
      InstanceAccessor<&NfsContext::GetWriteMax>("writeMax"),
      InstanceAccessor<&NfsContext::GetOutstanding>("outstanding"),
      InstanceAccessor<&NfsContext::GetPeak>("peakOutstanding"),
      InstanceAccessor<&NfsContext::GetSubmitted>("submitted"),
      InstanceAccessor<&NfsContext::GetFd>("fd"),
      InstanceAccessor<&NfsContext::GetDestroyed>("destroyed"),
    });
  }

  // new NfsContext({ timeoutMs?, stallMs?, autoReconnect?, clientName? })
  explicit NfsContext(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NfsContext>(info), env_(info.Env()) {
    Napi::Env env = info.Env();
    nfs_ = nfs_init_context();
    if (!nfs_) {
      Napi::Error::New(env, "nfs_init_context failed").ThrowAsJavaScriptException();
      return;
    }
    if (info.Length() > 0 && info[0].IsObject()) {
      Napi::Object o = info[0].As<Napi::Object>();
      Napi::Value t = o.Get("timeoutMs");
      if (t.IsNumber()) nfs_set_timeout(nfs_, t.As<Napi::Number>().Int32Value());
      Napi::Value st = o.Get("stallMs");
      if (st.IsNumber() && st.As<Napi::Number>().DoubleValue() > 0) stall_.Set(static_cast<uint64_t>(st.As<Napi::Number>().DoubleValue()));
      Napi::Value r = o.Get("autoReconnect");
      if (r.IsNumber()) nfs_set_autoreconnect(nfs_, r.As<Napi::Number>().Int32Value());
      // NFSv4 state (open stateids) belongs to a client id: contexts opened side by side
      // on one file (several connections per image) each need a name of their own.
      Napi::Value n = o.Get("clientName");
      if (n.IsString()) nfs4_set_client_name(nfs_, n.As<Napi::String>().Utf8Value().c_str());
    }
    service_.Start(this, env, "NfsContext");
  }

  ~NfsContext() override {
    // Normally destroy() ran already; this covers a context never destroyed when the
    // environment goes away (the cleanup hook destroyed it then).
    if (nfs_ && !destroyed_) Teardown(false);
  }

 private:
  // --- submitting ---------------------------------------------------------------

  bool CheckUsable(Napi::Env env, Napi::Promise::Deferred& d) {
    if (destroyed_) {
      d.Reject(NfsError(env, EBADF, "NFS context is closed"));
      return false;
    }
    if (!broken_.empty()) {
      d.Reject(NfsError(env, brokenErr_, broken_));
      return false;
    }
    return true;
  }

  // Queues one request. The promise is taken and the request counted before `submit`
  // runs: libnfs may call back synchronously (NFSv3 close does), freeing the request.
  // When libnfs refuses to queue, the promise rejects at once.
  template <typename F>
  Napi::Value Submit(Request* r, F submit) {
    Napi::Promise p = r->deferred.Promise();
    // The stall clock starts when the connection goes from idle to busy.
    if (outstanding_ == 0 && service_.started()) stall_.Busy(service_.Now());
    outstanding_++;
    int rc = submit();
    if (rc < 0) {
      outstanding_--;
      const char* e = nfs_get_error(nfs_);
      r->deferred.Reject(NfsError(Env(), rc < -1 ? -rc : EIO, e ? e : "request could not be queued"));
      delete r;
      return p;
    }
    submitted_++;
    UpdateEvents();
    return p;
  }

  Napi::Value Rejected(Napi::Env env, int err, const std::string& text) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Reject(NfsError(env, err, text));
    return d.Promise();
  }

  // mount(url) -> { server, export, file }: parses the URL (which also applies its
  // options, e.g. version=4, uid=, to the context) and mounts its export.
  Napi::Value Mount(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsString()) {
      Napi::TypeError::New(env, "mount(url): url must be a string").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    auto* r = new Request(this, Op::Mount, env);
    if (!CheckUsable(env, r->deferred)) { Napi::Promise p = r->deferred.Promise(); delete r; return p; }
    std::string url = info[0].As<Napi::String>().Utf8Value();
    struct nfs_url* u = nfs_parse_url_full(nfs_, url.c_str());
    if (!u) {
      const char* e = nfs_get_error(nfs_);
      Napi::Promise p = r->deferred.Promise();
      r->deferred.Reject(NfsError(env, EINVAL, std::string("invalid NFS URL: ") + (e ? e : url)));
      delete r;
      return p;
    }
    server_ = u->server ? u->server : "";
    export_ = u->path ? u->path : "";
    file_ = u->file ? u->file : "";
    Napi::Value p = Submit(r, [&] { return nfs_mount_async(nfs_, u->server, u->path, OnComplete, r); });
    nfs_destroy_url(u);  // nfs_mount_async copied server and export
    return p;
  }

  Napi::Value Umount(const Napi::CallbackInfo& info) {
    auto* r = new Request(this, Op::Umount, info.Env());
    if (!CheckUsable(info.Env(), r->deferred)) { Napi::Promise p = r->deferred.Promise(); delete r; return p; }
    return Submit(r, [&] { return nfs_umount_async(nfs_, OnComplete, r); });
  }

  // open(path, flags, mode) -> handle id. flags are Linux O_* (O_CREAT, O_TRUNC, ...).
  Napi::Value Open(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    blockconv::Args args(info, kArgWords);
    double flags, mode;
    if (info.Length() < 1 || !info[0].IsString()) {
      Napi::TypeError::New(env, "open(path, flags, mode): path must be a string").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    if (!args.Number(1, "flags", 0x7fffffff, &flags) || !args.Number(2, "mode", 07777, &mode)) return env.Undefined();
    auto* r = new Request(this, Op::Open, env);
    if (!CheckUsable(env, r->deferred)) { Napi::Promise p = r->deferred.Promise(); delete r; return p; }
    std::string path = info[0].As<Napi::String>().Utf8Value();
    return Submit(r, [&] { return nfs_open2_async(nfs_, path.c_str(), static_cast<int>(flags), static_cast<int>(mode), OnComplete, r); });
  }

  struct nfsfh* Handle(const Napi::CallbackInfo& info, bool remove = false) {
    double id;
    if (!blockconv::Args(info, kArgWords).Number(0, "handle", 0xffffffff, &id)) return nullptr;
    auto it = handles_.find(static_cast<uint32_t>(id));
    if (it == handles_.end()) return nullptr;
    struct nfsfh* fh = it->second;
    if (remove) handles_.erase(it);
    return fh;
  }

  // Common prologue of the file-handle operations. Null: already settled or thrown.
  Request* Begin(const Napi::CallbackInfo& info, Op op, struct nfsfh** fh, Napi::Value* ret, bool remove = false) {
    Napi::Env env = info.Env();
    if (destroyed_ || !broken_.empty()) {
      auto* r = new Request(this, op, env);
      CheckUsable(env, r->deferred);
      *ret = r->deferred.Promise();
      delete r;
      return nullptr;
    }
    *fh = Handle(info, remove);
    if (env.IsExceptionPending()) { *ret = env.Undefined(); return nullptr; }
    if (!*fh) { *ret = Rejected(env, EBADF, "unknown or closed NFS file handle"); return nullptr; }
    return new Request(this, op, env);
  }

  // The buffer and offset of pread and pwrite; the buffer is pinned until the callback.
  bool BufferAndOffset(const Napi::CallbackInfo& info, Request* r, double* offset) {
    blockconv::Args args(info, kArgWords);
    Napi::TypedArray buffer;
    if (!args.Bytes(1, "buffer", &buffer)) return false;
    r->buffer = blockconv::PinnedBuffer(buffer);
    return args.Number(2, "offset", kMaxSafeInteger, offset);
  }

  // pread(handle, buffer, offset) -> bytes read into buffer (fewer at EOF).
  Napi::Value Pread(const Napi::CallbackInfo& info) {
    struct nfsfh* fh;
    Napi::Value ret;
    Request* r = Begin(info, Op::Pread, &fh, &ret);
    if (!r) return ret;
    double offset;
    if (!BufferAndOffset(info, r, &offset)) { delete r; return info.Env().Undefined(); }
    return Submit(r, [&] { return nfs_pread_async(nfs_, fh, static_cast<uint64_t>(offset), r->buffer.length(), OnComplete, r); });
  }

  // pwrite(handle, buffer, offset) -> bytes written.
  Napi::Value Pwrite(const Napi::CallbackInfo& info) {
    struct nfsfh* fh;
    Napi::Value ret;
    Request* r = Begin(info, Op::Pwrite, &fh, &ret);
    if (!r) return ret;
    double offset;
    if (!BufferAndOffset(info, r, &offset)) { delete r; return info.Env().Undefined(); }
    return Submit(r, [&] {
      return nfs_pwrite_async(nfs_, fh, static_cast<uint64_t>(offset), r->buffer.length(), r->buffer.data(), OnComplete, r);
    });
  }

  Napi::Value Fstat(const Napi::CallbackInfo& info) {
    struct nfsfh* fh;
    Napi::Value ret;
    Request* r = Begin(info, Op::Fstat, &fh, &ret);
    if (!r) return ret;
    return Submit(r, [&] { return nfs_fstat64_async(nfs_, fh, OnComplete, r); });
  }

  Napi::Value Ftruncate(const Napi::CallbackInfo& info) {
    struct nfsfh* fh;
    Napi::Value ret;
    Request* r = Begin(info, Op::Ftruncate, &fh, &ret);
    if (!r) return ret;
    double size;
    if (!blockconv::Args(info, kArgWords).Number(1, "size", kMaxSafeInteger, &size)) { delete r; return info.Env().Undefined(); }
    return Submit(r, [&] { return nfs_ftruncate_async(nfs_, fh, static_cast<uint64_t>(size), OnComplete, r); });
  }

  Napi::Value Fsync(const Napi::CallbackInfo& info) {
    struct nfsfh* fh;
    Napi::Value ret;
    Request* r = Begin(info, Op::Fsync, &fh, &ret);
    if (!r) return ret;
    return Submit(r, [&] { return nfs_fsync_async(nfs_, fh, OnComplete, r); });
  }

  // close(handle): the id is invalid from the call on, whatever the result.
  Napi::Value Close(const Napi::CallbackInfo& info) {
    struct nfsfh* fh;
    Napi::Value ret;
    Request* r = Begin(info, Op::Close, &fh, &ret, true);
    if (!r) return ret;
    return Submit(r, [&] { return nfs_close_async(nfs_, fh, OnComplete, r); });
  }

  // destroy(): synchronous and idempotent. Requests in flight reject (ECANCELED).
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    if (!destroyed_) Teardown(true);
    return info.Env().Undefined();
  }

  Napi::Value GetReadMax(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), destroyed_ ? 0 : static_cast<double>(nfs_get_readmax(nfs_)));
  }
  Napi::Value GetWriteMax(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), destroyed_ ? 0 : static_cast<double>(nfs_get_writemax(nfs_)));
  }
  Napi::Value GetOutstanding(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), outstanding_); }
  Napi::Value GetPeak(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), peak_); }
  Napi::Value GetSubmitted(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), static_cast<double>(submitted_)); }
  Napi::Value GetFd(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), destroyed_ ? -1 : nfs_get_fd(nfs_));
  }
  Napi::Value GetDestroyed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), destroyed_); }

  // --- completion ---------------------------------------------------------------

  // A message worth showing: text, not a stray byte or two.
  static bool Printable(const char* s) {
    if (!s) return false;
    size_t n = 0;
    for (; s[n] && n < 512; n++) if (static_cast<unsigned char>(s[n]) < 0x20) return false;
    return n >= 4;
  }

  static void OnComplete(int err, struct nfs_context* nfs, void* data, void* priv) {
    auto* r = static_cast<Request*>(priv);
    NfsContext* self = r->ctx;
    // Peak of requests still in flight when one completes: > 1 proves pipelining.
    if (self->outstanding_ > self->peak_) self->peak_ = self->outstanding_;
    self->outstanding_--;
    if (self->nfs_ && self->service_.started()) self->stall_.Completed(nfs_get_fd(self->nfs_), self->service_.Now());
    if (self->envGone_) {  // environment teardown: no JS may run; just free
      r->buffer.Abandon();
      delete r;
      return;
    }
    Napi::Env env = self->env_;
    Napi::HandleScope scope(env);
    if (err < 0) r->deferred.Reject(self->Failure(-err, nfs, data));
    else r->deferred.Resolve(self->Success(env, r, err, data));
    delete r;
  }

  // Why a request failed: the context's fate when it was closed or broke, else libnfs's text.
  Napi::Value Failure(int code, struct nfs_context* nfs, void* data) {
    std::string text;
    if (destroyed_) {
      text = "NFS context closed with the request in flight";
      code = ECANCELED;
    } else if (!broken_.empty()) {
      text = broken_;
      code = brokenErr_;
    } else if (Printable(static_cast<const char*>(data))) {
      text = static_cast<const char*>(data);
    } else if (const char* e = nfs_get_error(nfs); Printable(e)) {
      // libnfs 4.0's write path sometimes hands back a pointer that is not its message
      // (seen: one byte, "\x1c", for NFS3ERR_NOSPC): its error string then says what failed.
      text = e;
    }
    return NfsError(env_, code, text);
  }

  // What a request resolves with; `result` is libnfs's status (bytes for pread/pwrite).
  Napi::Value Success(Napi::Env env, Request* r, int result, void* data) {
    switch (r->op) {
      case Op::Mount: {
        Napi::Object o = Napi::Object::New(env);
        o.Set("server", server_);
        o.Set("export", export_);
        o.Set("file", file_);
        return o;
      }
      case Op::Open: {
        uint32_t id = ++nextHandle_;
        handles_[id] = static_cast<struct nfsfh*>(data);
        return Napi::Number::New(env, id);
      }
      case Op::Pread: {
        size_t n = static_cast<size_t>(result);
        if (n > r->buffer.length()) n = r->buffer.length();
        // libnfs 4.0 reads into its own buffer; copy into the pinned caller buffer.
        if (n) memcpy(r->buffer.data(), data, n);
        return Napi::Number::New(env, static_cast<double>(n));
      }
      case Op::Pwrite: return Napi::Number::New(env, result);
      case Op::Fstat: return StatObject(env, static_cast<struct nfs_stat_64*>(data));
      default: return env.Undefined();
    }
  }

  static Napi::Object StatObject(Napi::Env env, const struct nfs_stat_64* st) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("size", Napi::Number::New(env, static_cast<double>(st->nfs_size)));
    o.Set("mode", Napi::Number::New(env, static_cast<double>(st->nfs_mode)));
    o.Set("blocks", Napi::Number::New(env, static_cast<double>(st->nfs_blocks)));
    o.Set("blksize", Napi::Number::New(env, static_cast<double>(st->nfs_blksize)));
    // Identity: which file (a resumed convert refuses another) and its version.
    o.Set("dev", Napi::Number::New(env, static_cast<double>(st->nfs_dev)));
    o.Set("ino", Napi::Number::New(env, static_cast<double>(st->nfs_ino)));
    o.Set("mtimeSec", Napi::Number::New(env, static_cast<double>(st->nfs_mtime)));
    o.Set("mtimeNsec", Napi::Number::New(env, static_cast<double>(st->nfs_mtime_nsec)));
    return o;
  }

  // --- event loop (blockconv::ServiceLoop calls Service and OnEnvTeardown) ---------

  // nfs_service() inside a ServiceScope: completions settle promises, and the JS they
  // wake runs when the scope closes, after libnfs has returned.
  void Service(int revents) {
    if (destroyed_) return;
    service_.Run([&] {
      // The stall check runs on the tick (revents 0): every ~100 ms while busy.
      if (revents == 0 && stall_.Stalled(nfs_get_fd(nfs_), outstanding_, service_.Now())) {
        broken_ = "no answer from the NFS server " + server_ + " for " + stall_.Seconds() + " s with " + std::to_string(outstanding_) +
                  " requests waiting (server unreachable or not answering)";
        brokenErr_ = ETIMEDOUT;
        FailAll();
      } else if (nfs_service(nfs_, revents) < 0) {
        // The socket is beyond repair: fail everything in flight with libnfs's reason.
        const char* e = nfs_get_error(nfs_);
        broken_ = std::string("NFS connection failed: ") + (e && *e ? e : "socket error");
        brokenErr_ = ECONNRESET;
        FailAll();
      } else {
        UpdateEvents();
      }
    });
  }

  // Rejects every request by destroying the libnfs context (its callbacks then fire with
  // a cancel status) and keeps the JS object as a closed shell.
  void FailAll() {
    struct nfs_context* n = nfs_;
    service_.Close();
    handles_.clear();
    nfs_ = nullptr;
    broken_ = broken_.empty() ? "NFS connection failed" : broken_;
    nfs_destroy_context(n);  // fires the callbacks: see Failure's broken_ branch
    nfs_ = nfs_init_context();  // a fresh, unconnected context keeps the getters valid
  }

  // After every submit and service: the socket, the events nfs waits for, and whether
  // requests are in flight.
  void UpdateEvents() {
    if (destroyed_ || !nfs_) return;
    service_.Update(nfs_get_fd(nfs_), nfs_which_events(nfs_), outstanding_ > 0);
  }

  // `js`: destroy() was called, and the object may be collected once this returns.
  void Teardown(bool js) {
    destroyed_ = true;
    if (nfs_) {
      struct nfs_context* n = nfs_;
      nfs_ = nullptr;
      handles_.clear();  // libnfs frees nothing of open handles here; they die with the process
      nfs_destroy_context(n);  // pending callbacks fire now and reject (see Failure)
    }
    service_.Stop(js);
  }

  void OnEnvTeardown() {
    envGone_ = true;
    if (!destroyed_) Teardown(false);
  }

  friend class blockconv::ServiceLoop<NfsContext>;

  Napi::Env env_;
  struct nfs_context* nfs_ = nullptr;
  blockconv::ServiceLoop<NfsContext> service_;
  bool destroyed_ = false;
  bool envGone_ = false;
  std::string broken_;
  int brokenErr_ = EIO;
  int outstanding_ = 0;
  int peak_ = 0;
  blockconv::StallWatch stall_;
  uint64_t submitted_ = 0;  // requests libnfs accepted since creation
  uint32_t nextHandle_ = 0;
  std::unordered_map<uint32_t, struct nfsfh*> handles_;
  std::string server_, export_, file_;
};

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("NfsContext", NfsContext::Init(env));
  Napi::Object c = Napi::Object::New(env);
  c.Set("O_RDONLY", Napi::Number::New(env, O_RDONLY));
  c.Set("O_WRONLY", Napi::Number::New(env, O_WRONLY));
  c.Set("O_RDWR", Napi::Number::New(env, O_RDWR));
  c.Set("O_CREAT", Napi::Number::New(env, O_CREAT));
  c.Set("O_TRUNC", Napi::Number::New(env, O_TRUNC));
  c.Set("O_EXCL", Napi::Number::New(env, O_EXCL));
  c.Set("O_SYNC", Napi::Number::New(env, O_SYNC));
  exports.Set("constants", c);
  return exports;
}

}  // namespace

NODE_API_MODULE(nfs_binding, Init)
