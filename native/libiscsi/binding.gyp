{
  "targets": [{
    "includes": ["../napi-common/common.gypi"],
    "target_name": "iscsi_binding",
    "sources": ["src/libiscsi.cc"],
    "cflags": ["<!@(pkg-config --cflags libiscsi)"],
    "libraries": ["<!@(pkg-config --libs libiscsi)"]
  }]
}
