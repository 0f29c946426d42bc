// UvHandle: a libuv handle owned as std::unique_ptr owns memory. libuv may use a
// handle after uv_close() until its close callback has run, so its memory can only be
// freed there: dropping a UvHandle closes the handle and frees it in that callback
// (zeromq.js owns its poll and timer handles the same way). A handle that was never
// initialised (its init call failed: type still 0) is freed at once, as uv_close()
// must not see it.
#pragma once

#include <uv.h>

#include <memory>

namespace blockconv {

template <typename T>
struct UvClose {
  void operator()(T* handle) const {
    auto* h = reinterpret_cast<uv_handle_t*>(handle);
    if (h->type == UV_UNKNOWN_HANDLE) {
      delete handle;
      return;
    }
    h->data = nullptr;  // a callback already under way finds no owner
    uv_close(h, [](uv_handle_t* closed) { delete reinterpret_cast<T*>(closed); });
  }
};

template <typename T>
using UvHandle = std::unique_ptr<T, UvClose<T>>;

// A zeroed handle for uv_*_init().
template <typename T>
UvHandle<T> NewUvHandle() {
  return UvHandle<T>(new T{});
}

template <typename T>
uv_handle_t* AsUvHandle(const UvHandle<T>& handle) {
  return reinterpret_cast<uv_handle_t*>(handle.get());
}

}  // namespace blockconv
