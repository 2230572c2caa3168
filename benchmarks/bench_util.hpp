// Pieces shared by the benchmark programs (pushy-loadgen, pushy-pusher,
// pushy-hops): the clock their stamps use and nearest-rank percentiles.
#pragma once

#include <time.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace pushy_bench {

// Returns CLOCK_MONOTONIC in nanoseconds: the clock of every "ts" stamp.
inline std::uint64_t now_ns() {
    timespec ts{};
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return std::uint64_t(ts.tv_sec) * 1'000'000'000u + std::uint64_t(ts.tv_nsec);
}

// Returns the nearest-rank percentile `q` (0..1) of sorted `v`, or 0.
inline std::uint32_t percentile(const std::vector<std::uint32_t>& v, double q) {
    if (v.empty()) return 0;
    auto rank = std::size_t(q * double(v.size()) + 0.999999);
    rank = std::clamp<std::size_t>(rank, 1, v.size());
    return v[rank - 1];
}

}  // namespace pushy_bench
