// For binding.gyp: "include_dirs": ["<!@(node -p \"require('@blockconv/napi-common').include\")"]
const path = require('node:path');
exports.include = JSON.stringify(path.join(__dirname, 'include'));
