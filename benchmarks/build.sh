#!/bin/sh
# Builds the load generator and the floor probes without the package (the
# package installs them, and pushy-pusher, which needs the engine).
#
# Usage: benchmarks/build.sh [OUTPUT_DIR]
#   Writes OUTPUT_DIR/pushy-loadgen, pushy-hops, pushy-fanout and
#   pushy-connects (default OUTPUT_DIR: build/bench under the repository
#   root) and creates the directory. CXX overrides g++. The load generator links OpenSSL 3
#   (libssl-dev) for --tls.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dir=${1:-"$root/build/bench"}
mkdir -p "$dir"
for tool in loadgen hops fanout connects; do
    case $tool in
        loadgen) libs="-lssl -lcrypto" ;;
        *) libs= ;;
    esac
    # $libs unquoted: one word per library.
    ${CXX:-g++} -O2 -std=c++20 -Wall -Wextra -o "$dir/pushy-$tool" \
        "$here/$tool.cpp" $libs
    echo "built $dir/pushy-$tool"
done
