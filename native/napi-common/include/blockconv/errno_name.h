// ErrnoName: an errno's symbolic name ("ENOENT"), for the `code` of the errors the
// addons reject with. glibc's names are the C ones (EOPNOTSUPP for 95); elsewhere
// (musl) they are libuv's, as Node's fs uses (ENOTSUP for 95).
#pragma once

#include <string.h>
#include <uv.h>

#include <string>

namespace blockconv {

inline std::string ErrnoName(int err) {
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 32)
  if (const char* name = strerrorname_np(err)) return name;
#endif
  char buf[64];
  return uv_err_name_r(-err, buf, sizeof buf);
}

}  // namespace blockconv
