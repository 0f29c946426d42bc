{
  "targets": [{
    "includes": ["../napi-common/common.gypi"],
    "target_name": "fileio",
    "sources": ["src/fileio.cc"]
  }]
}
