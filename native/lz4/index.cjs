// The compiled addon (binding.gyp); see snapctl_lz4.c for what it does.
module.exports = require('./build/Release/snapctl_lz4.node')
