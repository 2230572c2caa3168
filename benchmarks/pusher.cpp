// pushy-pusher: a service pushing to devices, for `pushy bench unicast`
// and `pushy bench latency`.
//
// It is a service of DESIGN.md's direct push: the push library
// (pushy::push_client, the engine behind PushClient(redis=...)) looks each
// device up in the registry (then in its route cache) and sends the push
// over a peer link to the node holding it. Devices are PREFIX0 ..
// PREFIX(N-1), picked at random (xorshift, fixed seed).
//
// Open loop (--rate R): push k is due at t0 + k/R. The loop sleeps to the
// next due time and sends every push that is due, each carrying its due
// time (CLOCK_MONOTONIC ns) as "ts" in its data, so a device measures the
// latency from when the push was due, never from when a late loop sent it
// (no coordinated omission). Closed loop (--rate 0): at most --window
// pushes in flight, as fast as the answers come back.
//
// With --warm, every device gets one push first (untimed, without "ts")
// so that the route cache and the peer links are filled before the timed
// pushes. The report (one JSON line on stdout) has the pushes sent, their
// answers by code, the latency from due time to answer, and this
// process's CPU time.

#include <signal.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "bench_util.hpp"
#include "pushy/config.hpp"
#include "pushy/push_client.hpp"

namespace {

using pushy_bench::now_ns;
using pushy_bench::percentile;

// Sleeps until CLOCK_MONOTONIC reaches `ns`.
void sleep_until(std::uint64_t ns) {
    timespec ts{};
    ts.tv_sec = time_t(ns / 1'000'000'000u);
    ts.tv_nsec = long(ns % 1'000'000'000u);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) ==
           EINTR) {
    }
}

// This process's user + system CPU time in seconds.
double cpu_seconds() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

// The user + system CPU seconds of process `pid` so far (proc(5) stat
// fields 14 and 15), or 0 when it is gone.
double cpu_seconds_of(long pid) {
    std::string path = "/proc/" + std::to_string(pid) + "/stat";
    std::FILE* f = std::fopen(path.c_str(), "r");
    if (!f) return 0;
    char buf[1024];
    std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    const char* p = std::strrchr(buf, ')');
    if (!p) return 0;
    // After the name: state (field 3) ... utime (14), stime (15).
    unsigned long long utime = 0, stime = 0;
    int field = 2;
    for (const char* q = p + 1; *q && field < 15;) {
        while (*q == ' ') ++q;
        ++field;
        if (field == 14) utime = std::strtoull(q, nullptr, 10);
        if (field == 15) stime = std::strtoull(q, nullptr, 10);
        while (*q && *q != ' ') ++q;
    }
    return double(utime + stime) / double(sysconf(_SC_CLK_TCK));
}

// The summed CPU seconds of `pids`.
double cpu_seconds_of(const std::vector<long>& pids) {
    double s = 0;
    for (long p : pids) s += cpu_seconds_of(p);
    return s;
}

// Parses "PID,PID,...".
std::vector<long> parse_pids(const char* flag, const std::string& text) {
    std::vector<long> pids;
    std::size_t at = 0;
    while (at <= text.size()) {
        auto comma = text.find(',', at);
        auto item = text.substr(at, comma == std::string::npos ? std::string::npos
                                                               : comma - at);
        char* end = nullptr;
        long pid = std::strtol(item.c_str(), &end, 10);
        if (item.empty() || *end != '\0' || pid <= 0) {
            std::fprintf(stderr, "pushy-pusher: %s expects PID,PID,...\n", flag);
            std::exit(2);
        }
        pids.push_back(pid);
        if (comma == std::string::npos) break;
        at = comma + 1;
    }
    return pids;
}

struct options {
    std::string redis;
    std::string prefix = "pushy:";
    std::string device_prefix;
    std::size_t devices = 0;
    double rate = 0;           // pushes/s, open loop; 0: closed loop
    std::size_t count = 0;     // pushes to send (closed loop)
    double seconds = 10;       // how long to send (open loop)
    std::size_t window = 2000;  // pushes in flight (closed loop)
    std::size_t data_bytes = 0;  // padding in each push's data
    double timeout_s = 10;
    bool warm = false;
    std::vector<long> node_pids;    // CPU sampled over the timed pushes
    std::vector<long> device_pids;
};

[[noreturn]] void usage(int code) {
    std::fputs(
        "usage: pushy-pusher --redis URL --devices PREFIX:N [--prefix P]\n"
        "                    (--rate R [--seconds S] | --count N [--window W])\n"
        "                    [--data-bytes B] [--timeout-s T] [--warm]\n"
        "                    [--node-pids PID,...] [--device-pids PID,...]\n"
        "\n"
        "Pushes to devices PREFIX0 .. PREFIX(N-1) through the registry at\n"
        "URL (keys under P, default pushy:): open loop at R pushes/s for S\n"
        "seconds, each push's data holding its due time as \"ts\"\n"
        "(CLOCK_MONOTONIC ns), or N pushes as fast as answers come back\n"
        "with W in flight. --warm pushes each device once first. The CPU\n"
        "time of the --node-pids and --device-pids processes is sampled\n"
        "around the timed pushes. Prints one JSON report on stdout.\n",
        code == 0 ? stdout : stderr);
    std::exit(code);
}

double number(const char* flag, const char* text) {
    char* end = nullptr;
    double v = std::strtod(text, &end);
    if (end == text || *end != '\0' || !(v >= 0)) {
        std::fprintf(stderr, "pushy-pusher: %s expects a number >= 0\n", flag);
        std::exit(2);
    }
    return v;
}

options parse(int argc, char** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") usage(0);
        if (a == "--warm") {
            o.warm = true;
            continue;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "pushy-pusher: %s needs a value\n", argv[i]);
            std::exit(2);
        }
        const char* v = argv[++i];
        if (a == "--redis") {
            o.redis = v;
        } else if (a == "--prefix") {
            o.prefix = v;
        } else if (a == "--devices") {
            std::string s = v;
            auto colon = s.rfind(':');
            if (colon == std::string::npos) usage(2);
            o.device_prefix = s.substr(0, colon);
            o.devices = std::size_t(number("--devices", s.c_str() + colon + 1));
        } else if (a == "--rate") {
            o.rate = number("--rate", v);
        } else if (a == "--seconds") {
            o.seconds = number("--seconds", v);
        } else if (a == "--count") {
            o.count = std::size_t(number("--count", v));
        } else if (a == "--window") {
            o.window = std::size_t(number("--window", v));
        } else if (a == "--data-bytes") {
            o.data_bytes = std::size_t(number("--data-bytes", v));
        } else if (a == "--node-pids") {
            o.node_pids = parse_pids("--node-pids", v);
        } else if (a == "--device-pids") {
            o.device_pids = parse_pids("--device-pids", v);
        } else if (a == "--timeout-s") {
            o.timeout_s = number("--timeout-s", v);
        } else {
            std::fprintf(stderr, "pushy-pusher: unknown option %s\n", argv[i]);
            usage(2);
        }
    }
    auto bad = [](const char* what) {
        std::fprintf(stderr, "pushy-pusher: %s\n", what);
        std::exit(2);
    };
    if (o.redis.empty()) bad("--redis URL is required");
    if (o.devices == 0) bad("--devices PREFIX:N needs N >= 1");
    if (o.rate == 0 && o.count == 0) bad("give --rate R or --count N");
    if (o.rate == 0 && o.window == 0) bad("--window must be at least 1");
    if (o.rate > 0 && o.seconds <= 0) bad("--seconds must be above 0");
    if (o.data_bytes > 65536) bad("--data-bytes must be at most 65536");
    return o;
}

// What the answers told; written on the client's thread, read after
// every push was answered.
struct tally {
    std::map<int, std::size_t> codes;
    std::vector<std::uint32_t> latency_us;  // due time to answer
    std::string first_failure;
};

// The answers' codes as a JSON object.
std::string codes_json(const tally& t) {
    std::string s = "{";
    for (auto& [code, n] : t.codes) {
        if (s.size() > 1) s += ",";
        s += "\"" + std::to_string(code) + "\":" + std::to_string(n);
    }
    return s + "}";
}

class pusher {
  public:
    explicit pusher(options o)
        : opt_(std::move(o)), client_(opt_.redis, opt_.prefix, opt_.timeout_s) {
        names_.reserve(opt_.devices);
        for (std::size_t i = 0; i < opt_.devices; ++i) {
            names_.push_back(opt_.device_prefix + std::to_string(i));
        }
        pad_.assign(opt_.data_bytes, 'x');
    }

    // Pushes once to every device, closed loop; answers other than 200
    // are counted apart.
    void warm() {
        for (std::size_t i = 0; i < names_.size(); ++i) {
            wait_below(opt_.window);
            send(names_[i], 0, warm_tally_);
        }
        wait_below(1);
    }

    // The timed pushes.
    void run() {
        xs_ = 0x9E3779B97F4A7C15ull;
        t0_ = now_ns();
        if (opt_.rate > 0) {
            auto n = std::size_t(opt_.rate * opt_.seconds);
            late_us_.reserve(n);
            double step = 1e9 / opt_.rate;
            std::size_t k = 0;
            while (k < n) {
                std::uint64_t now = now_ns();
                while (k < n) {
                    auto due = t0_ + std::uint64_t(double(k) * step);
                    if (due > now) {
                        sleep_until(due);
                        break;
                    }
                    late_us_.push_back(std::uint32_t(
                        std::min<std::uint64_t>((now_ns() - due) / 1000,
                                                UINT32_MAX)));
                    send(pick(), due, tally_);
                    ++k;
                }
            }
            sent_ = n;
        } else {
            for (std::size_t k = 0; k < opt_.count; ++k) {
                wait_below(opt_.window);
                send(pick(), now_ns(), tally_);
            }
            sent_ = opt_.count;
        }
        t_sent_ = now_ns();
        wait_below(1);
        t_done_ = now_ns();
    }

    std::string report(double cpu_s) {
        std::sort(tally_.latency_us.begin(), tally_.latency_us.end());
        auto& lat = tally_.latency_us;
        std::size_t ok = tally_.codes.count(200) ? tally_.codes[200] : 0;
        double send_s = double(t_sent_ - t0_) / 1e9;
        double all_s = double(t_done_ - t0_) / 1e9;
        char buf[256];
        std::string s = "{\"sent\":" + std::to_string(sent_);
        s += ",\"answered\":" + std::to_string(lat.size());
        s += ",\"delivered\":" + std::to_string(ok);
        s += ",\"codes\":" + codes_json(tally_);
        s += ",\"warm\":{\"sent\":" + std::to_string(names_.size() * opt_.warm);
        s += ",\"codes\":" + codes_json(warm_tally_) + "}";
        std::snprintf(buf, sizeof buf,
                      ",\"rate_target_per_s\":%.1f,\"send_s\":%.6f,"
                      "\"seconds\":%.6f,\"sent_per_s\":%.1f,"
                      "\"delivered_per_s\":%.1f,\"cpu_s\":%.3f",
                      opt_.rate, send_s, all_s,
                      double(sent_) / std::max(send_s, 1e-9),
                      double(ok) / std::max(all_s, 1e-9), cpu_s);
        s += buf;
        s += ",\"latency_us\":{\"count\":" + std::to_string(lat.size());
        for (auto [name, q] : {std::pair{"p50", 0.5}, {"p90", 0.9},
                               {"p99", 0.99}, {"p99.9", 0.999}}) {
            s += ",\"" + std::string(name) + "\":" +
                 std::to_string(percentile(lat, q));
        }
        s += ",\"max\":" + std::to_string(lat.empty() ? 0 : lat.back()) + "}";
        std::sort(late_us_.begin(), late_us_.end());
        s += ",\"send_late_us\":{\"p50\":" +
             std::to_string(percentile(late_us_, 0.5)) +
             ",\"p99\":" + std::to_string(percentile(late_us_, 0.99)) + "}";
        s += ",\"t0_ns\":" + std::to_string(t0_);
        s += ",\"cache_hits\":" + std::to_string(client_.cache_hits());
        s += ",\"cache_misses\":" + std::to_string(client_.cache_misses());
        s += ",\"first_failure\":\"";
        for (char c : tally_.first_failure) {
            if (c == '"' || c == '\\') s += '\\';
            if (static_cast<unsigned char>(c) >= 0x20) s += c;
        }
        s += "\"}";
        return s;
    }

    // Pushes answered so far, warm-up included.
    std::size_t answered() const {
        return answered_.load(std::memory_order_relaxed);
    }

  private:
    const std::string& pick() {
        xs_ ^= xs_ >> 12;
        xs_ ^= xs_ << 25;
        xs_ ^= xs_ >> 27;
        return names_[((xs_ * 0x2545F4914F6CDD1Dull) >> 32) % names_.size()];
    }

    // Sends one push; `due` 0 sends no "ts".
    void send(const std::string& device, std::uint64_t due, tally& t) {
        pushy::push_spec_in spec;
        spec.device = device;
        spec.from = "bench";
        spec.data.reserve(40 + pad_.size());
        spec.data = due ? "{\"ts\":" + std::to_string(due) : "{\"warm\":1";
        if (!pad_.empty()) spec.data += ",\"pad\":\"" + pad_ + "\"";
        spec.data += '}';
        in_flight_.fetch_add(1, std::memory_order_relaxed);
        client_.push_async(std::move(spec), [this, due, &t](pushy::push_result r) {
            ++t.codes[r.code];
            answered_.fetch_add(1, std::memory_order_relaxed);
            if (due) {
                auto now = now_ns();
                t.latency_us.push_back(std::uint32_t(
                    std::min<std::uint64_t>((now - due) / 1000, UINT32_MAX)));
            }
            if (r.code != 200 && t.first_failure.empty()) {
                t.first_failure = std::to_string(r.code) + " " + r.status +
                                  ": " + r.reason;
            }
            if (in_flight_.fetch_sub(1, std::memory_order_acq_rel) <=
                waiting_below_.load(std::memory_order_acquire)) {
                in_flight_.notify_one();
            }
        });
    }

    // Blocks until fewer than `n` pushes are in flight.
    void wait_below(std::size_t n) {
        waiting_below_.store(n, std::memory_order_release);
        for (;;) {
            auto v = in_flight_.load(std::memory_order_acquire);
            if (v < n) return;
            in_flight_.wait(v, std::memory_order_acquire);
        }
    }

    options opt_;
    pushy::push_client client_;
    std::vector<std::string> names_;
    std::string pad_;
    std::uint64_t xs_ = 1;
    std::atomic<std::size_t> in_flight_{0};
    std::atomic<std::size_t> answered_{0};
    std::atomic<std::size_t> waiting_below_{0};
    tally tally_;
    tally warm_tally_;
    std::vector<std::uint32_t> late_us_;  // due time to send (open loop)
    std::size_t sent_ = 0;
    std::uint64_t t0_ = 0, t_sent_ = 0, t_done_ = 0;
};

}  // namespace

int main(int argc, char** argv) {
    auto opt = parse(argc, argv);
    // Timers fire when due, not up to 50 us later (the default slack).
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    // End with the benchmark that started it, even if that one is killed.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    try {
        pusher p(opt);
        // Progress on stderr every half second, for the benchmark's bar.
        std::atomic<bool> done{false};
        std::thread progress([&] {
            while (!done.load()) {
                std::fprintf(stderr, "{\"event\":\"progress\",\"answered\":%zu}\n",
                             p.answered());
                std::fflush(stderr);
                for (int i = 0; i < 50 && !done.load(); ++i) {
                    std::this_thread::sleep_for(std::chrono::milliseconds(10));
                }
            }
        });
        struct joiner {
            std::atomic<bool>& done;
            std::thread& t;
            ~joiner() {
                done = true;
                t.join();
            }
        } join{done, progress};
        if (opt.warm) p.warm();
        double cpu0 = cpu_seconds();
        double node0 = cpu_seconds_of(opt.node_pids);
        double dev0 = cpu_seconds_of(opt.device_pids);
        p.run();
        double cpu = cpu_seconds() - cpu0;
        double node = cpu_seconds_of(opt.node_pids) - node0;
        double dev = cpu_seconds_of(opt.device_pids) - dev0;
        std::string r = p.report(cpu);
        char buf[128];
        std::snprintf(buf, sizeof buf, ",\"node_cpu_s\":%.3f,\"device_cpu_s\":%.3f}",
                      node, dev);
        r.pop_back();
        std::printf("%s%s\n", r.c_str(), buf);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "pushy-pusher: %s\n", e.what());
        return 1;
    }
    return 0;
}
