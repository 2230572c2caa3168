// Pieces shared by the benchmark programs (pushy-loadgen, pushy-pusher,
// pushy-hops, pushy-fanout, pushy-connects): the clock their stamps use,
// nearest-rank percentiles, CPU time and the open-file limit.
#pragma once

#include <sys/resource.h>
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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

// Prints `what` with errno's text and exits 1.
[[noreturn]] inline void die(const char* what) {
    std::perror(what);
    std::exit(1);
}

// Returns the CPU-seconds (user + system) of this process so far.
inline double cpu_seconds() {
    rusage r{};
    getrusage(RUSAGE_SELF, &r);
    return double(r.ru_utime.tv_sec + r.ru_stime.tv_sec) +
           double(r.ru_utime.tv_usec + r.ru_stime.tv_usec) / 1e6;
}

// Raises the soft open-file limit to what `n` sockets need (at most the
// hard limit).
inline void raise_file_limit(std::size_t n) {
    rlimit rl{};
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = std::min<rlim_t>(rl.rlim_max, n + 32);
    setrlimit(RLIMIT_NOFILE, &rl);
}

}  // namespace pushy_bench
