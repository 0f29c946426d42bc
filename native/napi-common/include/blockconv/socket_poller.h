// SocketPoller: drives a C client library's non-blocking socket from libuv's event loop,
// as QEMU and zeromq.js drive theirs. The library says which events it waits for
// (nfs_which_events(), iscsi_which_events()); the owner calls Update() after every
// submit and every service call, and the poller (re)arms a uv_poll_t to match:
// - it is re-created when the library reconnects (another fd, or the same fd number
//   now naming another socket: the inode tells them apart);
// - it keeps Node alive only while requests are in flight: an idle connection always
//   waits for POLLIN, and must not hold the process open by itself;
// - a periodic tick calls the service function with no events while requests are in
//   flight, so that the library's own timeouts (and the owner's stall check) fire; it
//   keeps Node alive only while requests are in flight, as the watcher does.
// Both handles are UvHandles (blockconv/uv_handle.h): dropped, they close themselves.
// Header-only, shared by @blockconv/libnfs and @blockconv/libiscsi.
#pragma once

#include <blockconv/uv_handle.h>

#include <poll.h>
#include <stdint.h>
#include <sys/stat.h>
#include <uv.h>

#include <utility>

namespace blockconv {

class SocketPoller {
 public:
  // Called with poll(2)-style revents (POLLIN, POLLOUT, POLLERR, POLLHUP) for the
  // library's service function.
  using ReadyFn = void (*)(void* owner, int revents);

  SocketPoller() = default;
  SocketPoller(const SocketPoller&) = delete;
  SocketPoller& operator=(const SocketPoller&) = delete;

  void Attach(uv_loop_t* loop, void* owner, ReadyFn onReady, uint64_t tickMs) {
    loop_ = loop;
    owner_ = owner;
    onReady_ = onReady;
    tick_ = NewUvHandle<uv_timer_t>();
    uv_timer_init(loop_, tick_.get());
    tick_->data = this;
    uv_timer_start(tick_.get(), OnTick, tickMs, tickMs);
    uv_unref(AsUvHandle(tick_));
  }

  // fd: the library's socket (< 0: none, the watcher closes); wantPoll: the POLLIN/POLLOUT
  // mask it waits for (0: "ask again later", the tick does); busy: requests in flight.
  void Update(int fd, int wantPoll, bool busy) {
    busy_ = busy;
    // While requests are in flight the tick keeps Node alive too: between sockets (a
    // reconnect) there is no watcher, and the loop must not end with requests pending.
    if (tick_ && busy != tickRef_) {
      SetRef(AsUvHandle(tick_), busy);
      tickRef_ = busy;
    }
    if (fd < 0) { CloseWatch(); return; }  // between sockets: the tick still services
    if (!Watch(fd)) return;
    int ev = ((wantPoll & POLLIN) ? UV_READABLE : 0) | ((wantPoll & POLLOUT) ? UV_WRITABLE : 0);
    if (ev != armed_) {
      if (ev) uv_poll_start(poll_.get(), ev, OnPoll);
      else uv_poll_stop(poll_.get());
      armed_ = ev;
    }
    if (busy != ref_) {
      SetRef(AsUvHandle(poll_), busy);
      ref_ = busy;
    }
  }

  // Stops the tick and the watcher for good (the owner is going away).
  void Detach() {
    Close();
    tick_.reset();
  }

  // The connection is gone (failed or closed): no more watching, no more ticks' service.
  void Close() {
    busy_ = false;
    if (tick_ && tickRef_) { uv_unref(AsUvHandle(tick_)); tickRef_ = false; }
    CloseWatch();
  }

 private:
  // A watcher on `fd`: the one there is while fd and the socket behind it are the same,
  // else a new one. False when libuv cannot watch it (the tick still services).
  bool Watch(int fd) {
    ino_t ino = SocketId(fd);
    if (poll_ && fd == fd_ && ino == ino_) return true;
    CloseWatch();
    UvHandle<uv_poll_t> poll = NewUvHandle<uv_poll_t>();
    if (uv_poll_init(loop_, poll.get(), fd) != 0) return false;
    poll->data = this;
    poll_ = std::move(poll);
    fd_ = fd;
    ino_ = ino;
    armed_ = 0;
    ref_ = true;
    return true;
  }

  // Stops watching the socket at once (the handle's memory goes once libuv has closed it).
  void CloseWatch() {
    poll_.reset();
    fd_ = -1;
    armed_ = 0;
  }

  static void SetRef(uv_handle_t* h, bool ref) {
    if (ref) uv_ref(h);
    else uv_unref(h);
  }

  static ino_t SocketId(int fd) {
    struct stat st;
    return fstat(fd, &st) == 0 ? st.st_ino : 0;
  }

  static void OnPoll(uv_poll_t* h, int status, int events) {
    auto* self = static_cast<SocketPoller*>(h->data);
    if (!self) return;
    int revents = 0;
    if (status < 0) revents |= POLLERR;
    if (events & UV_READABLE) revents |= POLLIN;
    if (events & UV_WRITABLE) revents |= POLLOUT;
    if (events & UV_DISCONNECT) revents |= POLLHUP;
    self->onReady_(self->owner_, revents);
  }

  static void OnTick(uv_timer_t* t) {
    auto* self = static_cast<SocketPoller*>(t->data);
    if (self && self->busy_) self->onReady_(self->owner_, 0);
  }

  uv_loop_t* loop_ = nullptr;
  UvHandle<uv_timer_t> tick_;
  bool busy_ = false;
  bool tickRef_ = false;
  void* owner_ = nullptr;
  ReadyFn onReady_ = nullptr;
  UvHandle<uv_poll_t> poll_;
  int fd_ = -1;
  ino_t ino_ = 0;
  int armed_ = 0;
  bool ref_ = true;
};

}  // namespace blockconv
