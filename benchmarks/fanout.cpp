// pushy-fanout: the host's floor for the CPU cost of unicast.
//
// A sender process writes --messages messages of --bytes bytes, each to a
// random one of --sockets loopback TCP connections, one send() each, as
// fast as it can; a receiver process holds the other ends in one epoll set
// and reads until every byte has arrived. Every socket has TCP_NODELAY, as
// a node's device sockets do, but nothing else happens: no parsing, no
// framing, no allocation, no timers. This is what any push server pays on
// this host to put one small message on one device's connection, so that
// `pushy bench unicast` can set the node's CPU per push against it. One
// JSON report on stdout: the CPU-seconds per million messages of the
// sender and of the receiver (taken over the sending only, not the
// connection setup), and the messages per second.
//
// On loopback the sender's send() also runs the receiving end's TCP (the
// kernel processes the segment in the sender's context), which on a
// network the device's host would pay: the floor is the same for every
// server measured here, the ratios hold, the absolute figure is the
// loopback one.

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "bench_util.hpp"

namespace {

using pushy_bench::cpu_seconds;
using pushy_bench::die;
using pushy_bench::now_ns;
using pushy_bench::raise_file_limit;

void no_delay(int s) {
    int one = 1;
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

// The receiver: connects `n` sockets to `port`, says so on `ready`, then
// reads until `total` bytes arrived; writes its CPU-seconds over the
// reading to `report`.
[[noreturn]] void receive(std::uint16_t port, std::size_t n,
                          std::uint64_t total, int ready, int report) {
    prctl(PR_SET_PDEATHSIG, 9);
    int ep = epoll_create1(0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    for (std::size_t i = 0; i < n; ++i) {
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (s < 0 || connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a)) {
            die("pushy-fanout: connect");
        }
        no_delay(s);
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.fd = s;
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
    }
    double cpu0 = cpu_seconds();
    if (write(ready, "r", 1) != 1) die("pushy-fanout: pipe");
    std::vector<char> buf(64 * 1024);
    std::uint64_t got = 0;
    epoll_event events[256];
    while (got < total) {
        int k = epoll_wait(ep, events, 256, 10'000);
        if (k <= 0) break;  // the sender stopped short
        for (int e = 0; e < k; ++e) {
            ssize_t r;
            while ((r = recv(events[e].data.fd, buf.data(), buf.size(),
                             MSG_DONTWAIT)) > 0) {
                got += std::uint64_t(r);
            }
        }
    }
    std::string out = std::to_string(cpu_seconds() - cpu0) + " " +
                      std::to_string(got) + "\n";
    if (write(report, out.data(), out.size()) < 0) _exit(1);
    _exit(0);
}

double number(const char* flag, const char* text) {
    char* end = nullptr;
    double v = std::strtod(text, &end);
    if (end == text || *end != '\0' || !(v > 0)) {
        std::fprintf(stderr, "pushy-fanout: %s expects a number above 0\n",
                     flag);
        std::exit(2);
    }
    return v;
}

}  // namespace

int main(int argc, char** argv) {
    std::size_t sockets = 10000, messages = 1000000, bytes = 100;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            std::puts(
                "usage: pushy-fanout [--sockets N] [--messages M] "
                "[--bytes B]\n\n"
                "CPU cost of M messages of B bytes (default 1000000 of 100)\n"
                "sent one send() each to random ones of N loopback TCP\n"
                "connections (default 10000, at most 18000) by a bare\n"
                "sender, read by a bare receiver. One JSON report.");
            return 0;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "pushy-fanout: %s needs a value\n", argv[i]);
            return 2;
        }
        auto v = std::size_t(number(argv[i], argv[i + 1]));
        ++i;
        if (a == "--sockets") {
            sockets = v;
        } else if (a == "--messages") {
            messages = v;
        } else if (a == "--bytes") {
            bytes = v;
        } else {
            std::fprintf(stderr, "pushy-fanout: unknown option %s\n",
                         a.c_str());
            return 2;
        }
    }
    if (sockets > 18000 || bytes > 65536) {
        std::fprintf(stderr, "pushy-fanout: --sockets is at most 18000 (the "
                             "open files of a process), --bytes 65536\n");
        return 2;
    }
    raise_file_limit(sockets);
    int lst = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (lst < 0 || bind(lst, reinterpret_cast<sockaddr*>(&a), len) != 0 ||
        listen(lst, 4096) != 0 ||
        getsockname(lst, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
        die("pushy-fanout: listen");
    }
    int ready[2], report[2];
    if (pipe(ready) != 0 || pipe(report) != 0) die("pushy-fanout: pipe");
    std::uint64_t total = std::uint64_t(messages) * bytes;
    pid_t pid = fork();
    if (pid == 0) receive(ntohs(a.sin_port), sockets, total, ready[1],
                          report[1]);
    std::vector<int> out(sockets);
    for (auto& s : out) {
        s = accept(lst, nullptr, nullptr);
        if (s < 0) die("pushy-fanout: accept");
        no_delay(s);
    }
    char c;
    if (read(ready[0], &c, 1) != 1) die("pushy-fanout: receiver");
    std::string message(bytes, 'x');
    std::mt19937_64 rng(1);
    std::uniform_int_distribution<std::size_t> pick(0, sockets - 1);
    std::uint64_t full = 0;
    double cpu0 = cpu_seconds();
    std::uint64_t t0 = now_ns();
    for (std::size_t k = 0; k < messages; ++k) {
        int s = out[pick(rng)];
        std::size_t sent = 0;
        while (sent < bytes) {
            ssize_t r = send(s, message.data() + sent, bytes - sent,
                             MSG_NOSIGNAL);
            if (r > 0) {
                sent += std::size_t(r);
            } else if (errno == EAGAIN || errno == EINTR) {
                ++full;  // the receiver is behind: try again
            } else {
                die("pushy-fanout: send");
            }
        }
    }
    double sender_cpu = cpu_seconds() - cpu0;
    double seconds = double(now_ns() - t0) / 1e9;
    char buf[128] = {};
    ssize_t n = read(report[0], buf, sizeof buf - 1);
    waitpid(pid, nullptr, 0);
    double receiver_cpu = 0;
    unsigned long long got = 0;
    if (n <= 0 || std::sscanf(buf, "%lf %llu", &receiver_cpu, &got) != 2) {
        std::fprintf(stderr, "pushy-fanout: the receiver gave no report\n");
        return 1;
    }
    double per_1m = 1e6 / double(messages);
    std::printf(
        "{\"sockets\":%zu,\"messages\":%zu,\"bytes\":%zu,"
        "\"received_bytes\":%llu,\"send_retries\":%llu,\"seconds\":%.3f,"
        "\"messages_per_s\":%.0f,\"sender_cpu_s_per_1m\":%.3f,"
        "\"receiver_cpu_s_per_1m\":%.3f}\n",
        sockets, messages, bytes, got, (unsigned long long)full, seconds,
        double(messages) / seconds, sender_cpu * per_1m,
        receiver_cpu * per_1m);
    return got == total ? 0 : 1;
}
