# The build settings every blockconv addon shares, included into the target of each
# binding.gyp ("includes": ["../napi-common/common.gypi"] inside the target, so that they
# come after node-gyp's defaults, as the target's own would: -std=c++17 after Node's
# -std=gnu++17). A binding.gyp adds only what is its own: target name, sources, system
# libraries. gyp resolves the relative include path below from this file's directory.
{
  "include_dirs": [
    "<!@(node -p \"require('node-addon-api').include\")",
    "include"
  ],
  "defines": [
    # The Node-API version the addons are written against; every Node >= 20 has it.
    "NAPI_VERSION=8",
    # Node builds addons with -fno-exceptions: node-addon-api then leaves failures as
    # pending JS exceptions, which the addons check after each call.
    "NAPI_DISABLE_CPP_EXCEPTIONS"
  ],
  "cflags_cc": ["-std=c++17", "-O2"]
}
