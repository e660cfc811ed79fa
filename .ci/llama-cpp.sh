#!/usr/bin/env bash
# Install llama-cpp-python (source-only on the registry: pip compiles llama.cpp, 6-9 min on 2 idle cores) from a wheel
# kept in PHI4_WHEEL_CACHE, building that wheel once when it is missing. Fails loudly: the GGUF and server tests need it.
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
CACHE="${PHI4_WHEEL_CACHE:-$HOME/.cache/phi4-wheels}"
mkdir -p "$CACHE"
if python -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    python -m pip install -q "llama-cpp-python[server]==$VERSION" openai   # the server extra; no rebuild
    exit 0
fi
if ! ls "$CACHE"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1; then
    echo "[llama-cpp] building llama-cpp-python $VERSION into $CACHE (several minutes)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" python -m pip wheel -q --no-deps -w "$CACHE" \
        "llama-cpp-python==$VERSION"
fi
python -m pip install -q --find-links "$CACHE" "llama-cpp-python[server]==$VERSION" openai
python -c "import llama_cpp; print('[llama-cpp] llama_cpp', llama_cpp.__version__)"
