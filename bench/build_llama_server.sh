#!/usr/bin/env bash
# `make llama-server`: build llama.cpp's native server for `make bench`, from the llama.cpp source
# vendored in the llama-cpp-python sdist we pin (so both run the same llama.cpp). A benchmark
# peer only: nothing in the service uses it. Takes about 8 minutes on 2 cores, once.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)
DEST=${LLAMA_SERVER_DIR:-.bench/llama.cpp}
[ -n "$VERSION" ] || { echo "no llama-cpp-python pin in pyproject.toml" >&2; exit 1; }
if [ -x "$DEST/bin/llama-server" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
  echo "llama-server (llama-cpp-python $VERSION) already built: $DEST/bin/llama-server"
  exit 0
fi
command -v cmake >/dev/null || { echo "needs cmake and a C++ compiler (apt-get install cmake g++)" >&2; exit 1; }
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$src" "llama-cpp-python==$VERSION"
tar xzf "$src"/llama_cpp_python-*.tar.gz -C "$src"
mkdir -p "$DEST/bin"
# Native CPU code (-march=native), as llama-cpp-python builds by default: the same kernels.
cmake -S "$src"/llama_cpp_python-*/vendor/llama.cpp -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >/dev/null
cmake --build "$DEST/build" --target llama-server -j "$(nproc)"
cp "$DEST/build/bin/llama-server" "$DEST/bin/llama-server"
echo "$VERSION" > "$DEST/VERSION"
rm -rf "$DEST/build"
echo "built $DEST/bin/llama-server"
