{
  "targets": [{
    "target_name": "nfs_binding",
    "sources": ["src/libnfs.cc"],
    "include_dirs": ["<!@(node -p \"require('node-addon-api').include\")", "<!@(node -p \"require('@blockconv/napi-common').include\")"],
    "cflags": ["<!@(pkg-config --cflags libnfs)"],
    "libraries": ["<!@(pkg-config --libs libnfs)"],
    "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
    "cflags_cc": ["-std=c++17", "-O2"]
  }]
}
