{
  "targets": [{
    "includes": ["../napi-common/common.gypi"],
    "target_name": "nfs_binding",
    "sources": ["src/libnfs.cc"],
    "cflags": ["<!@(pkg-config --cflags libnfs)"],
    "libraries": ["<!@(pkg-config --libs libnfs)"]
  }]
}
