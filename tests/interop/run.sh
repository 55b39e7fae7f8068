#!/bin/sh
# make interop: llama.cpp runs the GGUF files moe.h writes (tests/interop/check.mjs).
# llama.cpp comes as the prebuilt binaries inside the npm packages node-llama-cpp and
# @node-llama-cpp/<platform>, pinned to $NODE_LLAMA_CPP_VERSION and installed once into
# $BUILD/npm (the npm registry is needed for that first install only; the test itself uses no
# network). Without node (>= 20) and npm, or when the install fails, it says so and skips
# (exit 0), unless INTEROP_REQUIRED=1 (then exit 1).
BUILD=${BUILD:-build}
V=${NODE_LLAMA_CPP_VERSION:?}
THREADS=${THREADS:-1}
PREFIX=$BUILD/npm
OUT=$BUILD/interop

skip() {
    echo "interop: skipped: $1"
    [ "${INTEROP_REQUIRED:-0}" = 1 ] && exit 1
    exit 0
}

command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || skip "node and npm are not installed (Debian: apt-get install nodejs npm)"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] 2>/dev/null || skip "node $(node --version) is older than 20, which node-llama-cpp $V needs"
case "$(node -p 'process.platform + "-" + process.arch')" in
    linux-x64) platform=linux-x64 ;;
    linux-arm64) platform=linux-arm64 ;;
    darwin-arm64) platform=mac-arm64-metal ;;
    darwin-x64) platform=mac-x64 ;;
    win32-x64) platform=win-x64 ;;
    *) skip "no prebuilt llama.cpp in node-llama-cpp for $(node -p 'process.platform + "-" + process.arch')" ;;
esac
have=$(node -p "try { require('./$PREFIX/node_modules/node-llama-cpp/package.json').version } catch (e) { '' }" 2>/dev/null)
if [ "$have" != "$V" ] || [ ! -d "$PREFIX/node_modules/@node-llama-cpp/$platform" ]; then
    echo "interop: installing node-llama-cpp@$V and @node-llama-cpp/$platform@$V into $PREFIX (npm)"
    mkdir -p "$PREFIX"
    # --omit=optional: only this platform's binaries (the CUDA and Vulkan builds are large);
    # --ignore-scripts: node-llama-cpp's postinstall would try to build llama.cpp from source
    npm install --prefix "$PREFIX" --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error \
        "node-llama-cpp@$V" "@node-llama-cpp/$platform@$V" >"$PREFIX/install.log" 2>&1 ||
        { tail -n 5 "$PREFIX/install.log"; skip "npm could not install node-llama-cpp@$V (see $PREFIX/install.log)"; }
fi
OMP_NUM_THREADS=$THREADS OMP_WAIT_POLICY=PASSIVE "$BUILD/interop/test_interchange" --interop "$OUT" || exit 1
node tests/interop/check.mjs "$OUT" "$PREFIX"
