// PinnedBuffer: the memory of a caller's TypedArray (a Buffer included) that C code goes
// on using after the call returned: a request in flight in libnfs or libiscsi, a job on
// libuv's thread pool. A persistent reference keeps the JS object, and so its
// ArrayBuffer, alive until the pin is dropped; the caller must leave the bytes alone
// until the promise settles (each addon's JS API says so). A pin is made and dropped on
// the JS thread only: the reference is a JS handle.
#pragma once

#include <napi.h>

#include <stddef.h>
#include <stdint.h>

namespace blockconv {

class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  explicit PinnedBuffer(const Napi::TypedArray& array)
      : data_(static_cast<uint8_t*>(array.ArrayBuffer().Data()) + array.ByteOffset()),
        length_(array.ByteLength()),
        ref_(Napi::Persistent(static_cast<Napi::Value>(array))) {}
  PinnedBuffer(PinnedBuffer&&) = default;
  PinnedBuffer& operator=(PinnedBuffer&&) = default;

  uint8_t* data() const { return data_; }
  size_t length() const { return length_; }
  // The memory as elements of the array's own type (an Int32Array's int32_t).
  template <typename T>
  T* as() const { return reinterpret_cast<T*>(data_); }

  // The environment is being torn down and no JS handle may be released any more: the
  // reference is left to go with the environment.
  void Abandon() { ref_.SuppressDestruct(); }

 private:
  uint8_t* data_ = nullptr;
  size_t length_ = 0;
  Napi::Reference<Napi::Value> ref_;
};

}  // namespace blockconv
