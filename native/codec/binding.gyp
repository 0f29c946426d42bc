{
  "targets": [{
    "includes": ["../napi-common/common.gypi"],
    "target_name": "codec",
    "sources": ["src/codec.cc"],
    "cflags": ["<!@(pkg-config --cflags libdeflate libzstd zlib)"],
    # zlib is linked in statically with its symbols hidden: the node binary exports its
    # own zlib (Chromium's), which would otherwise take the calls and compress
    # differently from qemu-img (same parameters, other bytes).
    "libraries": [
      "<!@(pkg-config --libs libdeflate libzstd)",
      "-Wl,--exclude-libs,libz.a",
      "<!@(pkg-config --variable=libdir zlib)/libz.a"
    ]
  }]
}
