#!/bin/sh
# Builds the idle-connection load generator.
#
# Usage: benchmarks/build.sh [OUTPUT_DIR]
#   Writes OUTPUT_DIR/pushy-loadgen (default OUTPUT_DIR: build/bench under
#   the repository root) and creates the directory. CXX overrides g++.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
dir=${1:-"$root/build/bench"}
mkdir -p "$dir"
${CXX:-g++} -O2 -std=c++20 -Wall -Wextra -o "$dir/pushy-loadgen" \
    "$here/loadgen.cpp"
echo "built $dir/pushy-loadgen"
