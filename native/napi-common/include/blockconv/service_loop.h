// ServiceLoop: drives a C client library's socket from the Node event loop for one
// binding object, the way QEMU's block/nfs.c drives libnfs from its AioContext: when
// libuv says the socket is ready (or the tick comes round), the object runs the
// library's service call (nfs_service, iscsi_service); after every submit and every
// service call it tells the loop what the library waits for now (Update). Completions
// run inside the service call and only settle promises.
//
// The service call runs inside a ServiceScope (after zeromq.js's AsyncScope):
// - a HandleScope, so that the handles completions make go when it returns;
// - a reference to the object, as JS run when the scope closes may drop the last one;
// - a CallbackScope, so that the JS the settled promises wake runs when the scope
//   closes, after the library has returned: nothing re-enters it from its own callback.
//
// The object stays alive while it is connected (Start takes a reference; Stop with
// dropSelfReference gives it back), because completions may arrive after JS dropped
// it; an environment torn down first calls the object's OnEnvTeardown(), in which no
// JS may run.
//
// Owner is a Napi::ObjectWrap with `void Service(int revents)` (revents 0: the tick)
// and `void OnEnvTeardown()`, reachable from here (public or a friend).
#pragma once

#include <blockconv/socket_poller.h>

#include <napi.h>
#include <uv.h>

#include <stdint.h>

#include <memory>

namespace blockconv {

// The service call's period while requests are in flight, for the libraries' own
// timeouts and the stall check.
constexpr uint64_t kServiceTickMs = 100;

template <typename Owner>
class ServiceScope {
 public:
  ServiceScope(Owner& owner, const Napi::AsyncContext& context)
      : handles_(owner.Env()), held_(owner), callbacks_(owner.Env(), context) {}

 private:
  class Held {
   public:
    explicit Held(Owner& owner) : owner_(owner) { owner_.Ref(); }
    ~Held() { owner_.Unref(); }

   private:
    Owner& owner_;
  };

  // Made in this order, closed in the reverse: the callback scope (and the JS it runs)
  // first, the reference next, the handles last.
  Napi::HandleScope handles_;
  Held held_;
  Napi::CallbackScope callbacks_;
};

template <typename Owner>
class ServiceLoop {
 public:
  ServiceLoop() = default;
  ServiceLoop(const ServiceLoop&) = delete;
  ServiceLoop& operator=(const ServiceLoop&) = delete;

  // Attaches to the environment's libuv loop: the socket poller and its tick, an async
  // context named `resource` for the completions, a reference to the owner and the
  // environment's cleanup hook. False, with a JS error pending, when there is no loop.
  bool Start(Owner* owner, Napi::Env env, const char* resource, uint64_t tickMs = kServiceTickMs) {
    if (napi_get_uv_event_loop(env, &loop_) != napi_ok || !loop_) {
      loop_ = nullptr;
      Napi::Error::New(env, "no libuv loop").ThrowAsJavaScriptException();
      return false;
    }
    owner_ = owner;
    env_ = env;
    poller_.Attach(loop_, this, OnReady, tickMs);
    async_ = std::make_unique<Napi::AsyncContext>(env, resource);
    owner_->Ref();
    napi_add_env_cleanup_hook(env, OnEnvTeardown, this);
    hooked_ = true;
    return true;
  }

  // Runs `service` (the library's service call and what follows it) inside a ServiceScope.
  template <typename F>
  void Run(F&& service) {
    ServiceScope<Owner> scope(*owner_, *async_);
    service();
  }

  // What the library waits for now: its socket (< 0: none), its poll(2) events, and
  // whether requests are in flight (an idle connection must not keep Node alive).
  void Update(int fd, int events, bool busy) { poller_.Update(fd, events, busy); }

  // The connection failed: no more watching its socket, nor ticks.
  void Close() { poller_.Close(); }

  // The owner is done with the library: stops for good. `dropSelfReference` (destroy()
  // from JS) gives back Start's reference, so the object may be collected.
  void Stop(bool dropSelfReference) {
    poller_.Detach();
    if (hooked_) {
      napi_remove_env_cleanup_hook(env_, OnEnvTeardown, this);
      hooked_ = false;
    }
    if (dropSelfReference && owner_) owner_->Unref();
  }

  bool started() const { return loop_ != nullptr; }
  // libuv's loop time in ms (the stall clock).
  uint64_t Now() const { return uv_now(loop_); }

 private:
  static void OnReady(void* self, int revents) { static_cast<ServiceLoop*>(self)->owner_->Service(revents); }

  static void OnEnvTeardown(void* arg) {
    auto* self = static_cast<ServiceLoop*>(arg);
    self->hooked_ = false;  // Node forgets a hook before it runs it
    self->owner_->OnEnvTeardown();
  }

  Owner* owner_ = nullptr;
  napi_env env_ = nullptr;
  uv_loop_t* loop_ = nullptr;
  SocketPoller poller_;
  std::unique_ptr<Napi::AsyncContext> async_;
  bool hooked_ = false;
};

}  // namespace blockconv
