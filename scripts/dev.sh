#!/usr/bin/env bash
# Sets Pushy up on a Debian 12 machine and runs one job:
#
#   scripts/dev.sh demo [ARGS]   install, then `pushy demo ARGS`
#   scripts/dev.sh test [ARGS]   install, then the C++ unit tests (ctest,
#                                under ASan/UBSan) and pytest ARGS
#   scripts/dev.sh sanitize      install into .venv-sanitize an engine
#                                built with ASan/UBSan, then pytest ARGS
#   scripts/dev.sh install       install only
#
# Installing means: the Debian packages the build and tests need (only the
# missing ones, with apt-get, as root; nginx with Nchan is the peer of
# `pushy bench peers`, which runs an nginx of its own, not the system's
# service), a virtual environment in .venv, and the package built into it
# with its test extras.
set -euo pipefail

cd "$(dirname "$0")/.."
job="${1:-demo}"
shift || true

debs=(
    g++ cmake ninja-build pkg-config ccache
    python3 python3-venv python3-dev
    libboost-dev libssl-dev libhiredis-dev libmsgpack-cxx-dev
    libspdlog-dev libjwt-dev libsimdjson-dev prometheus-cpp-dev doctest-dev
    redis-server
    nginx libnginx-mod-nchan
)

# Installs the Debian packages that are not installed yet.
install_debs() {
    local missing=()
    for p in "${debs[@]}"; do
        if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null |
            grep -q "install ok installed"; then
            missing+=("$p")
        fi
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "pushy: missing Debian packages: ${missing[*]}" >&2
        echo "pushy: run as root, or: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "pushy: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}

# Makes the virtual environment $venv (.venv unless set) and builds the
# package into it. The CMake build directory is kept in build/, so a second
# install only recompiles what changed.
venv=.venv
install_package() {
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    echo "pushy: building and installing the package into $venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        ".[test]" "$@"
}

# Builds and runs the C++ unit tests under AddressSanitizer and UBSan.
run_ctest() {
    cmake -S . -B build/ctest -G Ninja -DPUSHY_BUILD_MODULE=OFF \
        -DPUSHY_BUILD_TESTS=ON -DPUSHY_SANITIZE=ON >/dev/null
    cmake --build build/ctest
    ctest --test-dir build/ctest --output-on-failure
}

case "$job" in
    install)
        install_debs
        install_package
        ;;
    demo)
        install_debs
        install_package
        exec .venv/bin/pushy demo "$@"
        ;;
    test)
        install_debs
        install_package
        run_ctest
        exec .venv/bin/python -m pytest "$@"
        ;;
    sanitize)
        # A virtual environment of its own: an engine built with ASan runs
        # only with the runtime preloaded, so .venv keeps the plain build.
        install_debs
        venv=.venv-sanitize
        install_package --config-settings=cmake.define.PUSHY_SANITIZE=ON \
            --config-settings=build-dir=build/sanitize
        asan="$(gcc -print-file-name=libasan.so)"
        ubsan="$(gcc -print-file-name=libubsan.so)"
        LD_PRELOAD="$asan:$ubsan" ASAN_OPTIONS=detect_leaks=0 PUSHY_SANITIZED=1 \
            PATH="$PWD/$venv/bin:$PATH" exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: scripts/dev.sh demo|test|sanitize|install [ARGS]" >&2
        exit 2
        ;;
esac
