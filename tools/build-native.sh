#!/usr/bin/env bash
# Builds native/lz4 (LZ4 block codec into caller-owned buffers, CRC-32, writev of segments), the addon on snapctl's hot
# paths, when its build is missing or older than its sources. Run by `npm run build`.
# Why not npm's install script: npm 11 skips dependencies' install scripts unless package.json
# approves them, and it does not run them for a `file:` link at all (checked with npm 11.19), so
# `npm ci` alone leaves the addon unbuilt and snapctl on its slower JavaScript decoder.
set -euo pipefail
cd "$(dirname "$0")/../native/lz4"
out=build/Release/snapctl_lz4.node
fresh=1
for f in *.c *.h binding.gyp; do [ -e "$out" ] && [ "$out" -nt "$f" ] || fresh=0; done
if [ $fresh = 1 ]; then exit 0; fi
# node-gyp fetches Node's headers from nodejs.org unless told where they are: use the ones
# installed with Node (nodesource packages, official tarballs) when there are any.
node_prefix=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
if [ -z "${npm_config_nodedir:-}" ] && [ -e "$node_prefix/include/node/common.gypi" ]; then
  export npm_config_nodedir="$node_prefix"
fi
gyp=${npm_config_node_gyp:-}   # npm sets it for scripts: the node-gyp npm ships with
if [ -n "$gyp" ] && [ -e "$gyp" ]; then
  node "$gyp" rebuild --loglevel=warn >&2
else
  npx --yes node-gyp rebuild --loglevel=warn >&2
fi
echo "build: native/lz4 built" >&2
