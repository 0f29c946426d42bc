// Args: the argument checks of the addons' functions. C++ exceptions are off
// (NAPI_DISABLE_CPP_EXCEPTIONS, common.gypi), so a failed check leaves a pending JS
// exception and returns false, and the caller returns at once:
//   blockconv::Args args(info, kArgWords);
//   if (!args.Fd(0, &fd) || !args.Offset(1, "offset", &offset)) return info.Env().Undefined();
// A wrong type is a TypeError, a value out of range a RangeError. Numbers are
// non-negative integers up to a limit: offsets travel as JS numbers, exact only up to
// 2^53 - 1 (kMaxSafeInteger).
#pragma once

#include <napi.h>

#include <stdint.h>

#include <cmath>
#include <string>

namespace blockconv {

constexpr double kMaxSafeInteger = 9007199254740991.0;

// How an addon words its argument errors. Each keeps the words it had before these
// checks were shared: its callers, and their tests, may match them.
enum class ArgWords {
  kNode,          // 'The "lba" argument must be of type number', 'The value of "lba" is out of range'
  kNodeReceived,  // the same, and a RangeError ends in what was received: '... is out of range: -1'
  kShort,         // '"clusterSize" must be a number', '"clusterSize" is out of range'
};

class Args {
 public:
  Args(const Napi::CallbackInfo& info, ArgWords words) : info_(info), words_(words) {}

  Napi::Env Env() const { return info_.Env(); }
  size_t Length() const { return info_.Length(); }
  // undefined past the last argument
  Napi::Value operator[](size_t i) const { return info_[i]; }

  // At least `n` arguments; `fn` names the function in the message.
  bool AtLeast(size_t n, const char* fn) const {
    if (info_.Length() >= n) return true;
    const std::string count = std::to_string(n);
    return TypeError(words_ == ArgWords::kShort ? "expected " + count + " arguments or more"
                                                 : std::string(fn) + ": expected " + count + " arguments");
  }

  // A non-negative integer no larger than `max`.
  bool Number(size_t i, const char* name, double max, double* out) const {
    if (!info_[i].IsNumber()) return TypeError(MustBe(name, words_ == ArgWords::kShort ? "a number" : "of type number"));
    double v = info_[i].As<Napi::Number>().DoubleValue();
    if (!(v >= 0 && v <= max) || std::trunc(v) != v) return RangeError(OutOfRange(name, i));  // NaN fails the first test
    *out = v;
    return true;
  }

  template <typename T>
  bool Integer(size_t i, const char* name, double max, T* out) const {
    double v;
    if (!Number(i, name, max, &v)) return false;
    *out = static_cast<T>(v);
    return true;
  }

  bool Fd(size_t i, int* fd) const { return Integer(i, "fd", 2147483647.0, fd); }
  bool Offset(size_t i, const char* name, uint64_t* out) const { return Integer(i, name, kMaxSafeInteger, out); }

  // Typed arrays of one kind; a Buffer is a Uint8Array.
  bool Uint8Array(size_t i, const char* name, Napi::Uint8Array* out) const {
    return Typed(i, name, napi_uint8_array, "a Uint8Array", out);
  }
  bool Float64Array(size_t i, const char* name, Napi::Float64Array* out) const {
    return Typed(i, name, napi_float64_array, "a Float64Array", out);
  }
  bool Int32Array(size_t i, const char* name, Napi::Int32Array* out) const {
    return Typed(i, name, napi_int32_array, "an Int32Array", out);
  }

  // Memory to read from or write into: any TypedArray, a Buffer included.
  bool Bytes(size_t i, const char* name, Napi::TypedArray* out) const {
    if (!info_[i].IsTypedArray()) return TypeError(MustBe(name, "a TypedArray or Buffer"));
    *out = info_[i].As<Napi::TypedArray>();
    return true;
  }

  // The string at `i`, or "" when there is none.
  std::string OptionalString(size_t i) const {
    return info_[i].IsString() ? info_[i].As<Napi::String>().Utf8Value() : std::string();
  }

  // Throw and return false, for the callers' own checks.
  bool TypeError(const std::string& message) const {
    Napi::TypeError::New(info_.Env(), message).ThrowAsJavaScriptException();
    return false;
  }
  bool RangeError(const std::string& message) const {
    Napi::RangeError::New(info_.Env(), message).ThrowAsJavaScriptException();
    return false;
  }

 private:
  template <typename A>
  bool Typed(size_t i, const char* name, napi_typedarray_type type, const char* what, A* out) const {
    if (!info_[i].IsTypedArray() || info_[i].As<Napi::TypedArray>().TypedArrayType() != type) {
      return TypeError(MustBe(name, what));
    }
    *out = info_[i].As<A>();
    return true;
  }

  std::string MustBe(const char* name, const char* what) const {
    if (words_ == ArgWords::kShort) return std::string("\"") + name + "\" must be " + what;
    return std::string("The \"") + name + "\" argument must be " + what;
  }

  std::string OutOfRange(const char* name, size_t i) const {
    switch (words_) {
      case ArgWords::kShort: return std::string("\"") + name + "\" is out of range";
      case ArgWords::kNode: return std::string("The value of \"") + name + "\" is out of range";
      case ArgWords::kNodeReceived: break;
    }
    return std::string("The value of \"") + name + "\" is out of range: " + info_[i].ToString().Utf8Value();
  }

  const Napi::CallbackInfo& info_;
  const ArgWords words_;
};

}  // namespace blockconv
