{
  "targets": [{
    "target_name": "codec",
    "sources": ["src/codec.cc"],
    "include_dirs": ["<!@(node -p \"require('node-addon-api').include\")"],
    "cflags": ["<!@(pkg-config --cflags libdeflate libzstd zlib)"],
    # zlib is linked in statically with its symbols hidden: the node binary exports its
    # own zlib (Chromium's), which would otherwise take the calls and compress
    # differently from qemu-img (same parameters, other bytes).
    "libraries": [
      "<!@(pkg-config --libs libdeflate libzstd)",
      "-Wl,--exclude-libs,libz.a",
      "<!@(pkg-config --variable=libdir zlib)/libz.a"
    ],
    "defines": ["NAPI_VERSION=8", "NAPI_DISABLE_CPP_EXCEPTIONS"],
    "cflags_cc": ["-std=c++17", "-O2"]
  }]
}
