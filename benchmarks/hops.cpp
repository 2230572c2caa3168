// pushy-hops: the host's floor for a message relayed over loopback TCP.
//
// A sender process writes a 16-byte message open loop at --rate
// messages/s: the CLOCK_MONOTONIC time it was due and the time it was
// sent. Each of --hops - 1 relay processes reads it and writes it on; a
// receiver takes the time from each stamp to its arrival (from the due
// time as `pushy bench latency` does, and from the send, which leaves out
// the sender's late timer wake-ups).
// Every process waits in epoll_wait and every socket has TCP_NODELAY, as
// a service, a node and a device do, but nothing else happens: no
// parsing, no framing, no allocation. Two hops are the shape of a direct
// push (service -> node -> device), so their latency is the least any
// push server can show on this host; `pushy bench latency` runs this next
// to its phases. One JSON report on stdout.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace {

using pushy_bench::die;
using pushy_bench::now_ns;
using pushy_bench::percentile;

// A listening socket on 127.0.0.1 and a free port; returns the socket.
int listen_any(std::uint16_t& port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (s < 0 || bind(s, reinterpret_cast<sockaddr*>(&a), len) != 0 ||
        listen(s, 4) != 0 ||
        getsockname(s, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
        die("pushy-hops: listen");
    }
    port = ntohs(a.sin_port);
    return s;
}

int connect_to(std::uint16_t port) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (s < 0 || connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
        die("pushy-hops: connect");
    }
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return s;
}

struct stamp_t {
    std::uint64_t due;
    std::uint64_t sent;
};

// Reads exactly one message, waiting in epoll_wait when none is there;
// false at the end of the stream.
bool read_stamp(int ep, int fd, stamp_t& stamp) {
    for (;;) {
        ssize_t n = recv(fd, &stamp, sizeof stamp, MSG_DONTWAIT);
        if (n == ssize_t(sizeof stamp)) return true;
        if (n == 0) return false;
        if (n > 0) {
            // A stamp split over two segments: read the rest.
            std::size_t got = std::size_t(n);
            auto* p = reinterpret_cast<char*>(&stamp);
            while (got < sizeof stamp) {
                ssize_t m = recv(fd, p + got, sizeof stamp - got, 0);
                if (m <= 0) return false;
                got += std::size_t(m);
            }
            return true;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            return false;
        }
        epoll_event ev{};
        epoll_wait(ep, &ev, 1, -1);
    }
}

int epoll_for(int fd) {
    int ep = epoll_create1(0);
    epoll_event ev{};
    ev.events = EPOLLIN | EPOLLET;
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) != 0) {
        die("pushy-hops: epoll");
    }
    return ep;
}

double number(const char* flag, const char* text) {
    char* end = nullptr;
    double v = std::strtod(text, &end);
    if (end == text || *end != '\0' || !(v > 0)) {
        std::fprintf(stderr, "pushy-hops: %s expects a number above 0\n", flag);
        std::exit(2);
    }
    return v;
}

}  // namespace

int main(int argc, char** argv) {
    int hops = 2;
    double rate = 1000;
    std::size_t count = 5000;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            std::puts("usage: pushy-hops [--hops N] [--rate R] [--count N]\n\n"
                      "One-way latency of a 16-byte message relayed over N\n"
                      "loopback TCP hops (1-4, default 2) by processes that\n"
                      "wait in epoll_wait, sent open loop at R/s (default\n"
                      "1000), N stamps (default 5000). One JSON report.");
            return 0;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "pushy-hops: %s needs a value\n", argv[i]);
            return 2;
        }
        double v = number(argv[i], argv[i + 1]);
        ++i;
        if (a == "--hops") {
            hops = int(v);
        } else if (a == "--rate") {
            rate = v;
        } else if (a == "--count") {
            count = std::size_t(v);
        } else {
            std::fprintf(stderr, "pushy-hops: unknown option %s\n", a.c_str());
            return 2;
        }
    }
    if (hops < 1 || hops > 4) {
        std::fprintf(stderr, "pushy-hops: --hops must be 1-4\n");
        return 2;
    }
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    // Listener k feeds hop k + 1; the receiver listens last.
    std::vector<int> listeners(static_cast<std::size_t>(hops));
    std::vector<std::uint16_t> ports(static_cast<std::size_t>(hops));
    for (int k = 0; k < hops; ++k) listeners[k] = listen_any(ports[k]);
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) die("pushy-hops: pipe");
    std::vector<pid_t> children;
    // The receiver: accepts on the last listener, reports through the pipe.
    pid_t pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, 9);
        int in = accept(listeners[hops - 1], nullptr, nullptr);
        int ep = epoll_for(in);
        std::vector<std::uint32_t> from_due, from_send;
        from_due.reserve(count);
        from_send.reserve(count);
        stamp_t stamp{};
        while (from_due.size() < count && read_stamp(ep, in, stamp)) {
            auto now = now_ns();
            from_due.push_back(std::uint32_t((now - stamp.due) / 1000));
            from_send.push_back(std::uint32_t((now - stamp.sent) / 1000));
        }
        std::string r = "{\"hops\":" + std::to_string(hops) +
                        ",\"count\":" + std::to_string(from_due.size());
        for (auto* v : {&from_due, &from_send}) {
            std::sort(v->begin(), v->end());
            r += v == &from_due ? ",\"from_due_us\":{" : ",\"from_send_us\":{";
            for (auto [name, q] : {std::pair{"p50", 0.5}, {"p99", 0.99},
                                   {"p99.9", 0.999}}) {
                if (name[1] != '5') r += ",";
                r += "\"" + std::string(name) + "\":" +
                     std::to_string(percentile(*v, q));
            }
            r += "}";
        }
        r += "}\n";
        if (write(pipe_fds[1], r.data(), r.size()) < 0) _exit(1);
        _exit(0);
    }
    children.push_back(pid);
    // The relays: relay k reads from listener k - 1, writes to listener k.
    for (int k = 1; k < hops; ++k) {
        pid = fork();
        if (pid == 0) {
            prctl(PR_SET_PDEATHSIG, 9);
            int in = accept(listeners[k - 1], nullptr, nullptr);
            int out = connect_to(ports[k]);
            int ep = epoll_for(in);
            stamp_t stamp{};
            while (read_stamp(ep, in, stamp)) {
                if (send(out, &stamp, sizeof stamp, MSG_NOSIGNAL) < 0) break;
            }
            _exit(0);
        }
        children.push_back(pid);
    }
    int out = connect_to(ports[0]);
    double step = 1e9 / rate;
    std::uint64_t t0 = now_ns() + 1'000'000;
    for (std::size_t k = 0; k < count; ++k) {
        std::uint64_t due = t0 + std::uint64_t(double(k) * step);
        timespec ts{time_t(due / 1'000'000'000u), long(due % 1'000'000'000u)};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) ==
               EINTR) {
        }
        stamp_t stamp{due, now_ns()};
        if (send(out, &stamp, sizeof stamp, MSG_NOSIGNAL) < 0) break;
    }
    close(out);
    char buf[512];
    ssize_t n = read(pipe_fds[0], buf, sizeof buf - 1);
    for (pid_t c : children) waitpid(c, nullptr, 0);
    if (n <= 0) {
        std::fprintf(stderr, "pushy-hops: the receiver gave no report\n");
        return 1;
    }
    std::fwrite(buf, 1, std::size_t(n), stdout);
    return 0;
}
