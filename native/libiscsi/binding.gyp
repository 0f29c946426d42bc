{
  "targets": [{
    "target_name": "iscsi_binding",
    "sources": ["src/libiscsi.cc"],
    "include_dirs": ["<!@(node -p \"require('node-addon-api').include\")", "<!@(node -p \"require('@blockconv/napi-common').include\")"],
    "cflags": ["<!@(pkg-config --cflags libiscsi)"],
    "libraries": ["<!@(pkg-config --libs libiscsi)"],
    "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
    "cflags_cc": ["-std=c++17", "-O2"]
  }]
}
