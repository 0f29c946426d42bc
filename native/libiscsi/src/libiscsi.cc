// Node binding over libiscsi's asynchronous API (libiscsi 1.19). One IscsiContext is
// one iSCSI session to one LUN; its socket is driven from the Node event loop the way
// QEMU's block/iscsi.c drives it from its AioContext:
//  - a uv_poll_t on iscsi_get_fd() (blockconv::ServiceLoop, @blockconv/napi-common), armed
//    with iscsi_which_events() after every submit and every iscsi_service() call, and re-armed only when the mask changes (POLLOUT
//    only while libiscsi has output queued: level-triggered polls busy-loop otherwise);
//  - a ~100 ms tick (the ServiceLoop's) calling iscsi_service(ctx, 0) so libiscsi's task timeouts fire,
//    and checking the stall timeout (`stallMs`): tasks fail when the socket has moved no
//    byte for that long while they wait (blockconv::SocketProgress), not when they have
//    waited that long, which a slow link with many tasks queued would trip
//    (and so a 0 from iscsi_which_events, "try again later", is retried);
//  - the poll handle is re-created when the fd, or the socket behind it, changes.
// Completions run inside iscsi_service(); they only settle promises and queue the task
// for freeing after libiscsi has returned. JS continuations run when the callback scope
// around iscsi_service() closes, so nothing re-enters libiscsi from its own callback.
// Reads land directly in the caller's (pinned) buffer; writes go out of it: no copies.
// Automatic reconnection is off: a lost session fails every task in flight at once
// (the caller decides whether to reconnect), so a dead target never means a hang.

#include <napi.h>

#include <blockconv/napi_args.h>
#include <blockconv/pinned_buffer.h>
#include <blockconv/service_loop.h>
#include <blockconv/socket_progress.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/uio.h>

#include <string>
#include <unordered_set>
#include <vector>

extern "C" {
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>
}

namespace {

using blockconv::kMaxSafeInteger;
constexpr blockconv::ArgWords kArgWords = blockconv::ArgWords::kNode;

enum class Op { Connect, Logout, Read, Write, WriteSame, Unmap, GetLbaStatus, SyncCache, ReadCapacity, Inquiry };

const char* OpName(Op op) {
  switch (op) {
    case Op::Connect: return "login";
    case Op::Logout: return "logout";
    case Op::Read: return "READ(16)";
    case Op::Write: return "WRITE(16)";
    case Op::WriteSame: return "WRITE SAME(16)";
    case Op::Unmap: return "UNMAP";
    case Op::GetLbaStatus: return "GET LBA STATUS";
    case Op::SyncCache: return "SYNCHRONIZE CACHE(16)";
    case Op::ReadCapacity: return "READ CAPACITY(16)";
    case Op::Inquiry: return "INQUIRY";
  }
  return "?";
}

class IscsiContext;

// One task in flight. The caller's buffer stays referenced (pinned) until completion.
struct Request {
  IscsiContext* ctx;
  Op op;
  Napi::Promise::Deferred deferred;
  blockconv::PinnedBuffer buffer;    // READ(16) into it, WRITE(16) out of it
  struct iovec iov = {nullptr, 0};  // same layout as libiscsi's opaque scsi_iovec (QEMU relies on it too)
  std::vector<uint8_t> zeroes;       // WRITE SAME's one block of zeroes
  struct unmap_list range = {0, 0};
  int page = -1;                     // INQUIRY: VPD page, -1 = standard data
  bool settled = false;
  Request(IscsiContext* c, Op o, Napi::Env env) : ctx(c), op(o), deferred(Napi::Promise::Deferred::New(env)) {}
};

// An Error with `code`, the SCSI `status` and, for CHECK CONDITION, the sense data.
// The TS layer turns these fields into the user-facing message.
Napi::Value IscsiError(Napi::Env env, const char* code, const std::string& text, Op op, int status = -1,
                       const struct scsi_sense* sense = nullptr) {
  Napi::Error e = Napi::Error::New(env, text);
  Napi::Object o = e.Value();
  o.Set("code", code);
  o.Set("op", OpName(op));
  if (status >= 0) o.Set("status", Napi::Number::New(env, status));
  if (sense) {
    Napi::Object s = Napi::Object::New(env);
    s.Set("key", Napi::Number::New(env, sense->key));
    s.Set("asc", Napi::Number::New(env, (sense->ascq >> 8) & 0xff));
    s.Set("ascq", Napi::Number::New(env, sense->ascq & 0xff));
    const char* k = scsi_sense_key_str(sense->key);
    const char* a = scsi_sense_ascq_str(sense->ascq);
    s.Set("keyName", k ? k : "");
    s.Set("ascqName", a ? a : "");
    o.Set("sense", s);
  }
  return o;
}

class IscsiContext : public Napi::ObjectWrap<IscsiContext> {
 public:
  static Napi::Function Init(Napi::Env env) {
    return DefineClass(env, "IscsiContext", {
      InstanceMethod<&IscsiContext::Connect>("connect"),
      InstanceMethod<&IscsiContext::Logout>("logout"),
      InstanceMethod<&IscsiContext::Read16>("read16"),
      InstanceMethod<&IscsiContext::Write16>("write16"),
      InstanceMethod<&IscsiContext::WriteSame16>("writeSame16"),
      InstanceMethod<&IscsiContext::Unmap>("unmap"),
      InstanceMethod<&IscsiContext::GetLbaStatus>("getLbaStatus"),
      InstanceMethod<&IscsiContext::SyncCache16>("synchronizeCache16"),
      InstanceMethod<&IscsiContext::ReadCapacity16>("readCapacity16"),
      InstanceMethod<&IscsiContext::Inquiry>("inquiry"),
      InstanceMethod<&IscsiContext::Destroy>("destroy"),
      InstanceAccessor<&IscsiContext::GetOutstanding>("outstanding"),
      InstanceAccessor<&IscsiContext::GetPeak>("peakOutstanding"),
      InstanceAccessor<&IscsiContext::GetFd>("fd"),
      InstanceAccessor<&IscsiContext::GetDestroyed>("destroyed"),
    });
  }

  // new IscsiContext({ initiatorName, timeoutSec?, stallMs? })
  explicit IscsiContext(const Napi::CallbackInfo& info) : Napi::ObjectWrap<IscsiContext>(info), env_(info.Env()) {
    Napi::Env env = info.Env();
    std::string initiator = "iqn.2026-11.org.blockconv:initiator";
    int timeout = 0;
    if (info.Length() > 0 && info[0].IsObject()) {
      Napi::Object o = info[0].As<Napi::Object>();
      Napi::Value n = o.Get("initiatorName");
      if (n.IsString()) initiator = n.As<Napi::String>().Utf8Value();
      Napi::Value t = o.Get("timeoutSec");
      if (t.IsNumber()) timeout = t.As<Napi::Number>().Int32Value();
      Napi::Value st = o.Get("stallMs");
      if (st.IsNumber() && st.As<Napi::Number>().DoubleValue() > 0) stall_.Set(static_cast<uint64_t>(st.As<Napi::Number>().DoubleValue()));
    }
    iscsi_ = iscsi_create_context(initiator.c_str());
    if (!iscsi_) {
      Napi::Error::New(env, "iscsi_create_context failed").ThrowAsJavaScriptException();
      return;
    }
    iscsi_set_session_type(iscsi_, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(iscsi_, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    if (timeout > 0) iscsi_set_timeout(iscsi_, timeout);
    // With a stall timeout, a lost session reconnects and its tasks are sent again: a
    // target restarted within the timeout is ridden through, and one that stays away
    // moves no byte and fails every task when the timeout runs out. Without one, a lost
    // session fails its tasks at once instead of waiting for a reconnect that may never come.
    iscsi_set_noautoreconnect(iscsi_, stall_.enabled() ? 0 : 1);
    service_.Start(this, env, "IscsiContext");
  }

  ~IscsiContext() override {
    if (iscsi_ && !destroyed_) Teardown(false);
  }

 private:
  // --- submitting ---------------------------------------------------------------

  Napi::Value Rejected(Napi::Env env, const char* code, const std::string& text, Op op) {
    auto d = Napi::Promise::Deferred::New(env);
    d.Reject(IscsiError(env, code, text, op));
    return d.Promise();
  }

  // Null when the context cannot take a task (the returned promise is then rejected).
  Request* Begin(Napi::Env env, Op op, Napi::Value* ret) {
    if (destroyed_) { *ret = Rejected(env, "EBADF", "iSCSI session is closed", op); return nullptr; }
    if (!broken_.empty()) { *ret = Rejected(env, brokenCode_.c_str(), broken_, op); return nullptr; }
    if (op != Op::Connect && !connected_) { *ret = Rejected(env, "ENOTCONN", "iSCSI session is not logged in", op); return nullptr; }
    return new Request(this, op, env);
  }

  // Queues one task: `submit` returns the libiscsi task (or 0/-1 for login/logout).
  // The request is counted before submit runs; a refusal rejects at once.
  template <typename F>
  Napi::Value Submit(Request* r, F submit) {
    Napi::Promise p = r->deferred.Promise();
    pending_.insert(r);
    // The stall clock starts when the session goes from idle to busy.
    if (outstanding_ == 0 && service_.started()) stall_.Busy(service_.Now());
    outstanding_++;
    if (outstanding_ > peak_) peak_ = outstanding_;
    bool ok = submit();
    if (!ok) {
      pending_.erase(r);
      outstanding_--;
      const char* e = iscsi_get_error(iscsi_);
      r->deferred.Reject(IscsiError(Env(), "EIO", std::string("task could not be queued: ") + (e && *e ? e : "out of memory"), r->op));
      delete r;
      return p;
    }
    UpdateEvents();
    return p;
  }

  // The task's one iovec: the caller's buffer at `i`, pinned until the task completes.
  bool PinIovec(const blockconv::Args& args, size_t i, Request* r) {
    Napi::TypedArray buffer;
    if (!args.Bytes(i, "buffer", &buffer)) return false;
    r->buffer = blockconv::PinnedBuffer(buffer);
    r->iov.iov_base = r->buffer.data();
    r->iov.iov_len = r->buffer.length();
    return true;
  }

  // connect(portal, targetIqn, lun, user?, password?): TCP connect, login (CHAP when a
  // user is given), then TEST UNIT READY on the LUN, all by iscsi_full_connect_async.
  Napi::Value Connect(const Napi::CallbackInfo& info) {
    blockconv::Args args(info, kArgWords);
    Napi::Env env = info.Env();
    double lun;
    if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString()) {
      Napi::TypeError::New(env, "connect(portal, target, lun, user?, password?)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    if (!args.Number(2, "lun", 16383, &lun)) return env.Undefined();
    Napi::Value ret;
    if (connected_ || connecting_) return Rejected(env, "EISCONN", "iSCSI session already logged in", Op::Connect);
    Request* r = Begin(env, Op::Connect, &ret);
    if (!r) return ret;
    std::string portal = args.OptionalString(0), target = args.OptionalString(1), user = args.OptionalString(3), pass = args.OptionalString(4);
    if (iscsi_set_targetname(iscsi_, target.c_str()) != 0) {
      delete r;
      return Rejected(env, "EINVAL", "invalid target name", Op::Connect);
    }
    if (!user.empty() && iscsi_set_initiator_username_pwd(iscsi_, user.c_str(), pass.c_str()) != 0) {
      delete r;
      return Rejected(env, "EINVAL", "CHAP credentials not accepted by libiscsi", Op::Connect);
    }
    // The password now lives in libiscsi only; wipe our copy.
    std::fill(pass.begin(), pass.end(), '\0');
    lun_ = static_cast<int>(lun);
    portal_ = portal;
    connecting_ = r;
    return Submit(r, [&] { return iscsi_full_connect_async(iscsi_, portal.c_str(), static_cast<int>(lun), OnConnect, this) == 0; });
  }

  Napi::Value Logout(const Napi::CallbackInfo& info) {
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::Logout, &ret);
    if (!r) return ret;
    connected_ = false;  // no new tasks after this point
    return Submit(r, [&] { return iscsi_logout_async(iscsi_, OnTask, r) == 0; });
  }

  // read16(lba, blocks, blockSize, buffer): the data lands in buffer (blocks*blockSize bytes).
  Napi::Value Read16(const Napi::CallbackInfo& info) {
    blockconv::Args args(info, kArgWords);
    double lba, blocks, bs;
    if (!args.Number(0, "lba", kMaxSafeInteger, &lba) || !args.Number(1, "blocks", 0xffffffff, &blocks) ||
        !args.Number(2, "blockSize", 1 << 20, &bs)) return info.Env().Undefined();
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::Read, &ret);
    if (!r) return ret;
    if (!PinIovec(args, 3, r)) { delete r; return info.Env().Undefined(); }
    if (blocks * bs > 0xffffffff) { delete r; return Rejected(info.Env(), "EINVAL", "read larger than 4 GiB", Op::Read); }
    uint32_t len = static_cast<uint32_t>(blocks * bs);
    if (r->iov.iov_len < len) { delete r; return Rejected(info.Env(), "EINVAL", "buffer too small for the read", Op::Read); }
    r->iov.iov_len = len;
    return Submit(r, [&] {
      return iscsi_read16_iov_task(iscsi_, lun_, static_cast<uint64_t>(lba), len, static_cast<int>(bs), 0, 0, 0, 0, 0,
                                   OnTask, r, reinterpret_cast<struct scsi_iovec*>(&r->iov), 1) != nullptr;
    });
  }

  // write16(lba, blockSize, buffer, fua): writes all of buffer (a whole number of blocks).
  Napi::Value Write16(const Napi::CallbackInfo& info) {
    blockconv::Args args(info, kArgWords);
    double lba, bs;
    if (!args.Number(0, "lba", kMaxSafeInteger, &lba) || !args.Number(1, "blockSize", 1 << 20, &bs)) return info.Env().Undefined();
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::Write, &ret);
    if (!r) return ret;
    if (!PinIovec(args, 2, r)) { delete r; return info.Env().Undefined(); }
    int fua = info.Length() > 3 && info[3].ToBoolean().Value() ? 1 : 0;
    if (r->iov.iov_len > 0xffffffff || r->iov.iov_len % static_cast<size_t>(bs) != 0) {
      delete r;
      return Rejected(info.Env(), "EINVAL", "write length must be whole blocks, at most 4 GiB", Op::Write);
    }
    uint32_t len = static_cast<uint32_t>(r->iov.iov_len);
    return Submit(r, [&] {
      return iscsi_write16_iov_task(iscsi_, lun_, static_cast<uint64_t>(lba), nullptr, len, static_cast<int>(bs), 0, 0, fua, 0, 0,
                                    OnTask, r, reinterpret_cast<struct scsi_iovec*>(&r->iov), 1) != nullptr;
    });
  }

  // writeSame16(lba, blocks, blockSize, unmap): zeroes `blocks` blocks (UNMAP bit: may deallocate).
  Napi::Value WriteSame16(const Napi::CallbackInfo& info) {
    blockconv::Args args(info, kArgWords);
    double lba, blocks, bs;
    if (!args.Number(0, "lba", kMaxSafeInteger, &lba) || !args.Number(1, "blocks", 0xffffffff, &blocks) ||
        !args.Number(2, "blockSize", 1 << 20, &bs)) return info.Env().Undefined();
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::WriteSame, &ret);
    if (!r) return ret;
    int unmap = info.Length() > 3 && info[3].ToBoolean().Value() ? 1 : 0;
    r->zeroes.assign(static_cast<size_t>(bs), 0);
    return Submit(r, [&] {
      return iscsi_writesame16_task(iscsi_, lun_, static_cast<uint64_t>(lba), r->zeroes.data(), static_cast<uint32_t>(bs),
                                    static_cast<uint32_t>(blocks), 0, unmap, 0, 0, OnTask, r) != nullptr;
    });
  }

  // unmap(lba, blocks): one block descriptor.
  Napi::Value Unmap(const Napi::CallbackInfo& info) {
    blockconv::Args args(info, kArgWords);
    double lba, blocks;
    if (!args.Number(0, "lba", kMaxSafeInteger, &lba) || !args.Number(1, "blocks", 0xffffffff, &blocks)) return info.Env().Undefined();
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::Unmap, &ret);
    if (!r) return ret;
    r->range.lba = static_cast<uint64_t>(lba);
    r->range.num = static_cast<uint32_t>(blocks);
    return Submit(r, [&] { return iscsi_unmap_task(iscsi_, lun_, 0, 0, &r->range, 1, OnTask, r) != nullptr; });
  }

  // getLbaStatus(lba, maxDescriptors) -> [{ lba, blocks, provisioning }] (0 mapped,
  // 1 deallocated, 2 anchored), the first descriptor covering lba.
  Napi::Value GetLbaStatus(const Napi::CallbackInfo& info) {
    blockconv::Args args(info, kArgWords);
    double lba, max;
    if (!args.Number(0, "lba", kMaxSafeInteger, &lba) || !args.Number(1, "maxDescriptors", 65535, &max)) return info.Env().Undefined();
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::GetLbaStatus, &ret);
    if (!r) return ret;
    // 8 header bytes + 16 per descriptor.
    uint32_t alloc = 8 + 16 * static_cast<uint32_t>(max < 1 ? 1 : max);
    return Submit(r, [&] { return iscsi_get_lba_status_task(iscsi_, lun_, static_cast<uint64_t>(lba), alloc, OnTask, r) != nullptr; });
  }

  Napi::Value SyncCache16(const Napi::CallbackInfo& info) {
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::SyncCache, &ret);
    if (!r) return ret;
    return Submit(r, [&] { return iscsi_synchronizecache16_task(iscsi_, lun_, 0, 0, 0, 0, OnTask, r) != nullptr; });
  }

  Napi::Value ReadCapacity16(const Napi::CallbackInfo& info) {
    Napi::Value ret;
    Request* r = Begin(info.Env(), Op::ReadCapacity, &ret);
    if (!r) return ret;
    return Submit(r, [&] { return iscsi_readcapacity16_task(iscsi_, lun_, OnTask, r) != nullptr; });
  }

  // inquiry(page): -1 standard data; 0x00 supported VPD pages; 0xB0 Block Limits;
  // 0xB2 Logical Block Provisioning.
  Napi::Value Inquiry(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsNumber()) {
      Napi::TypeError::New(env, "inquiry(page)").ThrowAsJavaScriptException();
      return env.Undefined();
    }
    int page = info[0].As<Napi::Number>().Int32Value();
    if (page != -1 && page != 0x00 && page != 0xb0 && page != 0xb2) return Rejected(env, "EINVAL", "unsupported VPD page", Op::Inquiry);
    Napi::Value ret;
    Request* r = Begin(env, Op::Inquiry, &ret);
    if (!r) return ret;
    r->page = page;
    return Submit(r, [&] { return iscsi_inquiry_task(iscsi_, lun_, page >= 0 ? 1 : 0, page >= 0 ? page : 0, 255, OnTask, r) != nullptr; });
  }

  // destroy(): synchronous and idempotent. Tasks in flight reject (ECANCELED).
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    if (!destroyed_) Teardown(true);
    return info.Env().Undefined();
  }

  Napi::Value GetOutstanding(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), outstanding_); }
  Napi::Value GetPeak(const Napi::CallbackInfo& info) { return Napi::Number::New(info.Env(), peak_); }
  Napi::Value GetFd(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), destroyed_ || !iscsi_ ? -1 : iscsi_get_fd(iscsi_));
  }
  Napi::Value GetDestroyed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), destroyed_); }

  // --- completion ---------------------------------------------------------------

  // Takes `r` out of the pending set; false if it was already settled (e.g. by teardown).
  bool Finish(Request* r) {
    if (!pending_.erase(r)) return false;
    outstanding_--;
    if (iscsi_ && service_.started()) stall_.Completed(iscsi_get_fd(iscsi_), service_.Now());
    return true;
  }

  static void OnConnect(struct iscsi_context* iscsi, int status, void* command_data, void* priv) {
    auto* self = static_cast<IscsiContext*>(priv);
    Request* r = self->connecting_;
    // full_connect calls back a second time when an established session is torn down.
    if (!r) return;
    self->connecting_ = nullptr;
    if (!self->Finish(r)) return;
    if (self->envGone_) { delete r; return; }
    Napi::Env env = self->env_;
    Napi::HandleScope scope(env);
    if (status == SCSI_STATUS_GOOD) {
      self->connected_ = true;
      r->deferred.Resolve(env.Undefined());
    } else {
      const char* e = iscsi_get_error(iscsi);
      std::string text = e && *e ? e : "login failed";
      const char* code = self->destroyed_ ? "ECANCELED" : "EIO";
      r->deferred.Reject(IscsiError(env, code, text, Op::Connect, status));
    }
    delete r;
  }

  static void OnTask(struct iscsi_context* iscsi, int status, void* command_data, void* priv) {
    auto* r = static_cast<Request*>(priv);
    IscsiContext* self = r->ctx;
    // SCSI tasks come back as command_data; free them once libiscsi has returned.
    struct scsi_task* task = r->op == Op::Logout ? nullptr : static_cast<struct scsi_task*>(command_data);
    if (task) self->done_.push_back(task);
    if (!self->Finish(r)) return;
    if (self->envGone_) { r->buffer.Abandon(); delete r; return; }
    Napi::Env env = self->env_;
    Napi::HandleScope scope(env);
    if (status == SCSI_STATUS_GOOD) {
      r->deferred.Resolve(self->Result(env, r, task));
    } else if (status == SCSI_STATUS_CANCELLED) {
      if (!self->broken_.empty()) {
        r->deferred.Reject(IscsiError(env, self->brokenCode_.c_str(), self->broken_, r->op, status));
      } else if (!self->destroyed_) {
        // Not our teardown: libiscsi cancels the tasks itself when the socket fails.
        const char* e = iscsi_get_error(iscsi);
        r->deferred.Reject(IscsiError(env, "ECONNRESET", std::string("iSCSI connection lost: ") + (e && *e ? e : "socket error"), r->op, status));
      } else {
        r->deferred.Reject(IscsiError(env, "ECANCELED", "iSCSI session closed with the task in flight", r->op, status));
      }
    } else if (status == SCSI_STATUS_TIMEOUT) {
      r->deferred.Reject(IscsiError(env, "ETIMEDOUT", "the target did not answer in time", r->op, status));
    } else if (status == SCSI_STATUS_ERROR || !task) {
      const char* e = iscsi_get_error(iscsi);
      r->deferred.Reject(IscsiError(env, "ECONNRESET", e && *e ? e : "iSCSI transport error", r->op, status));
    } else {
      // A SCSI status from the target: CHECK CONDITION carries sense data.
      bool check = status == SCSI_STATUS_CHECK_CONDITION;
      r->deferred.Reject(IscsiError(env, "EIO", "SCSI error", r->op, status, check ? &task->sense : nullptr));
    }
    delete r;
  }

  Napi::Value Result(Napi::Env env, Request* r, struct scsi_task* task) {
    switch (r->op) {
      case Op::ReadCapacity: {
        auto* rc = static_cast<struct scsi_readcapacity16*>(scsi_datain_unmarshall(task));
        if (!rc) return env.Null();
        Napi::Object o = Napi::Object::New(env);
        o.Set("lastLba", Napi::Number::New(env, static_cast<double>(rc->returned_lba)));
        o.Set("blockSize", Napi::Number::New(env, rc->block_length));
        o.Set("lbpme", Napi::Boolean::New(env, rc->lbpme != 0));
        o.Set("lbprz", Napi::Boolean::New(env, rc->lbprz != 0));
        o.Set("lbppbe", Napi::Number::New(env, rc->lbppbe));
        return o;
      }
      case Op::GetLbaStatus: {
        auto* st = static_cast<struct scsi_get_lba_status*>(scsi_datain_unmarshall(task));
        Napi::Array a = Napi::Array::New(env);
        if (!st) return a;
        for (uint32_t i = 0; i < st->num_descriptors; i++) {
          Napi::Object d = Napi::Object::New(env);
          d.Set("lba", Napi::Number::New(env, static_cast<double>(st->descriptors[i].lba)));
          d.Set("blocks", Napi::Number::New(env, st->descriptors[i].num_blocks));
          d.Set("provisioning", Napi::Number::New(env, st->descriptors[i].provisioning));
          a.Set(i, d);
        }
        return a;
      }
      case Op::Inquiry: return InquiryResult(env, r->page, task);
      default: return env.Undefined();
    }
  }

  Napi::Value InquiryResult(Napi::Env env, int page, struct scsi_task* task) {
    void* p = scsi_datain_unmarshall(task);
    if (!p) return env.Null();
    Napi::Object o = Napi::Object::New(env);
    if (page == -1) {
      auto* s = static_cast<struct scsi_inquiry_standard*>(p);
      o.Set("deviceType", Napi::Number::New(env, s->device_type));
      o.Set("vendor", std::string(s->vendor_identification));
      o.Set("product", std::string(s->product_identification));
      o.Set("revision", std::string(s->product_revision_level));
    } else if (page == 0x00) {
      auto* s = static_cast<struct scsi_inquiry_supported_pages*>(p);
      Napi::Array a = Napi::Array::New(env);
      for (int i = 0; i < s->num_pages; i++) a.Set(i, Napi::Number::New(env, s->pages[i]));
      o.Set("pages", a);
    } else if (page == 0xb0) {
      auto* s = static_cast<struct scsi_inquiry_block_limits*>(p);
      o.Set("maxTransferBlocks", Napi::Number::New(env, s->max_xfer_len));
      o.Set("optimalTransferBlocks", Napi::Number::New(env, s->opt_xfer_len));
      o.Set("optimalGranularityBlocks", Napi::Number::New(env, s->opt_gran));
      o.Set("maxUnmapBlocks", Napi::Number::New(env, s->max_unmap));
      o.Set("maxUnmapDescriptors", Napi::Number::New(env, s->max_unmap_bdc));
      o.Set("optimalUnmapGranularity", Napi::Number::New(env, s->opt_unmap_gran));
      o.Set("maxWriteSameBlocks", Napi::Number::New(env, static_cast<double>(s->max_ws_len)));
    } else if (page == 0xb2) {
      auto* s = static_cast<struct scsi_inquiry_logical_block_provisioning*>(p);
      o.Set("lbpu", Napi::Boolean::New(env, s->lbpu != 0));
      o.Set("lbpws", Napi::Boolean::New(env, s->lbpws != 0));
      o.Set("lbpws10", Napi::Boolean::New(env, s->lbpws10 != 0));
      o.Set("lbprz", Napi::Boolean::New(env, s->lbprz != 0));
      o.Set("anc", Napi::Boolean::New(env, s->anc_sup != 0));
      o.Set("provisioningType", Napi::Number::New(env, s->provisioning_type));
    }
    return o;
  }

  void FreeDone() {
    for (struct scsi_task* t : done_) scsi_free_scsi_task(t);
    done_.clear();
  }

  // --- event loop (blockconv::ServiceLoop calls Service and OnEnvTeardown) ---------

  // iscsi_service() inside a ServiceScope: completions settle promises, and the JS they
  // wake runs when the scope closes, after libiscsi has returned.
  void Service(int revents) {
    if (destroyed_ || !iscsi_) return;  // !iscsi_: failed already (FailAll), nothing left to drive
    service_.Run([&] {
      // The stall check runs on the tick (revents 0): every ~100 ms while busy.
      if (revents == 0 && stall_.Stalled(iscsi_get_fd(iscsi_), outstanding_, service_.Now())) {
        broken_ = "no answer from the iSCSI target " + portal_ + " for " + stall_.Seconds() + " s with " + std::to_string(outstanding_) +
                  " tasks waiting (target unreachable or not answering)";
        brokenCode_ = "ETIMEDOUT";
        FailAll();
      } else if (iscsi_service(iscsi_, revents) < 0) {
        const char* e = iscsi_get_error(iscsi_);
        broken_ = std::string("iSCSI connection lost: ") + (e && *e ? e : "socket error");
        brokenCode_ = "ECONNRESET";
        FailAll();
      } else {
        UpdateEvents();
      }
      FreeDone();
    });
  }

  // The session is beyond repair: every task in flight rejects with the reason, and
  // the context stays a closed shell.
  void FailAll() {
    connected_ = false;
    service_.Close();
    struct iscsi_context* i = iscsi_;
    iscsi_ = nullptr;
    iscsi_scsi_cancel_all_tasks(i);  // callbacks fire with CANCELLED: see OnTask's broken_ branch
    iscsi_destroy_context(i);
    RejectLeftovers();
    FreeDone();
  }

  // Anything libiscsi did not call back (a login cut short) is settled here.
  void RejectLeftovers() {
    if (pending_.empty()) return;
    std::vector<Request*> left(pending_.begin(), pending_.end());
    pending_.clear();
    connecting_ = nullptr;
    for (Request* r : left) {
      outstanding_--;
      if (envGone_) { r->buffer.Abandon(); delete r; continue; }
      Napi::HandleScope scope(env_);
      if (!broken_.empty()) r->deferred.Reject(IscsiError(env_, brokenCode_.c_str(), broken_, r->op));
      else r->deferred.Reject(IscsiError(env_, "ECANCELED", "iSCSI session closed with the task in flight", r->op));
      delete r;
    }
  }

  // After every submit and service: the socket, the events iscsi waits for, and whether
  // requests are in flight (an idle connection must not keep Node alive).
  void UpdateEvents() {
    if (destroyed_ || !iscsi_) return;
    service_.Update(iscsi_get_fd(iscsi_), iscsi_which_events(iscsi_), outstanding_ > 0);
  }

  // `js`: destroy() was called, and the object may be collected once this returns.
  void Teardown(bool js) {
    destroyed_ = true;
    connected_ = false;
    if (iscsi_) {
      struct iscsi_context* i = iscsi_;
      iscsi_ = nullptr;
      iscsi_scsi_cancel_all_tasks(i);  // tasks in flight reject now (see OnTask)
      iscsi_destroy_context(i);
    }
    RejectLeftovers();
    FreeDone();
    service_.Stop(js);
  }

  void OnEnvTeardown() {
    envGone_ = true;
    if (!destroyed_) Teardown(false);
  }

  friend class blockconv::ServiceLoop<IscsiContext>;

  Napi::Env env_;
  struct iscsi_context* iscsi_ = nullptr;
  int lun_ = 0;
  blockconv::ServiceLoop<IscsiContext> service_;
  bool destroyed_ = false;
  bool envGone_ = false;
  bool connected_ = false;
  Request* connecting_ = nullptr;
  std::string broken_;
  std::string brokenCode_ = "EIO";
  int outstanding_ = 0;
  int peak_ = 0;
  blockconv::StallWatch stall_;
  std::string portal_;
  std::unordered_set<Request*> pending_;
  std::vector<struct scsi_task*> done_;
};

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("IscsiContext", IscsiContext::Init(env));
  return exports;
}

}  // namespace

NODE_API_MODULE(iscsi_binding, Init)
