// pushy-connects: the host's floor for connection setup.
//
// A client process opens --connections loopback TCP connections as fast as
// it can, --window at a time: on each, once connected, it writes a request
// of --request-bytes (an upgrade with its token is about 400) and reads a
// response of --response-bytes (a 101 with hello, about 250), then keeps the
// connection open. A server process accepts them (epoll), reads each
// request and writes the response. Both sides do what a load generator and
// a WebSocket server must do at the socket level for an upgrade, and
// nothing else: no HTTP parsing, no token, no registry, no allocation per
// connection. This is what the host pays for one upgrade's TCP work, so
// that `pushy bench connect` can set its rate against it. One JSON report
// on stdout: connections per second, and the CPU-microseconds per
// connection of the client and of the server.
//
// Every socket has TCP_NODELAY; the client binds with
// IP_BIND_ADDRESS_NO_PORT to --sources addresses in turn (16 of them,
// 127.0.0.2 to 127.0.0.17), as pushy-loadgen does: connect() searches a
// free port per source address, which grows slow as one fills up.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_util.hpp"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

namespace {

using pushy_bench::cpu_seconds;
using pushy_bench::die;
using pushy_bench::now_ns;
using pushy_bench::raise_file_limit;

struct options {
    std::size_t connections = 18000;
    std::size_t window = 256;
    std::size_t request = 400;
    std::size_t response = 250;
    std::size_t sources = 16;
};

// The server: accepts on `lst` until `n` connections have had their
// response; writes its CPU-seconds (from the first accept) to `report`.
[[noreturn]] void serve(int lst, const options& o, int report) {
    prctl(PR_SET_PDEATHSIG, 9);
    int ep = epoll_create1(0);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = lst;
    epoll_ctl(ep, EPOLL_CTL_ADD, lst, &ev);
    std::vector<std::uint32_t> got(65536, 0);  // request bytes read, by fd
    std::string response(o.response, 'r');
    std::vector<char> buf(64 * 1024);
    std::size_t answered = 0;
    double cpu0 = -1;
    epoll_event events[256];
    while (answered < o.connections) {
        int k = epoll_wait(ep, events, 256, 30'000);
        if (k <= 0) break;
        if (cpu0 < 0) cpu0 = cpu_seconds();
        for (int e = 0; e < k; ++e) {
            int fd = events[e].data.fd;
            if (fd == lst) {
                int c;
                while ((c = accept4(lst, nullptr, nullptr, SOCK_NONBLOCK)) >=
                       0) {
                    int one = 1;
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    epoll_event cev{};
                    cev.events = EPOLLIN;
                    cev.data.fd = c;
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t r;
            while ((r = recv(fd, buf.data(), buf.size(), 0)) > 0) {
                got[std::size_t(fd)] += std::uint32_t(r);
            }
            if (got[std::size_t(fd)] >= o.request) {
                got[std::size_t(fd)] = 0;
                // Idle from now on: no more events for it.
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
                if (send(fd, response.data(), response.size(),
                         MSG_NOSIGNAL) != ssize_t(response.size())) {
                    die("pushy-connects: server send");
                }
                ++answered;
            }
        }
    }
    std::string out = std::to_string(cpu0 < 0 ? 0 : cpu_seconds() - cpu0) + "\n";
    if (write(report, out.data(), out.size()) < 0) _exit(1);
    // Keep the connections until the client is done with its figures.
    char c;
    if (read(report, &c, 1) < 0) _exit(0);
    _exit(0);
}

std::size_t number(const char* flag, const char* text) {
    char* end = nullptr;
    double v = std::strtod(text, &end);
    if (end == text || *end != '\0' || !(v >= 1)) {
        std::fprintf(stderr, "pushy-connects: %s expects a number >= 1\n",
                     flag);
        std::exit(2);
    }
    return std::size_t(v);
}

}  // namespace

int main(int argc, char** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            std::puts(
                "usage: pushy-connects [--connections N] [--window W]\n"
                "                      [--request-bytes B] "
                "[--response-bytes B] [--sources K]\n\n"
                "Connection setup of N loopback TCP connections (default\n"
                "18000, at most 18000), W at a time (256): each writes a\n"
                "request of B bytes (400) and reads a response (250) from a\n"
                "bare server; K source addresses from 127.0.0.2 (16). One\n"
                "JSON report: rate, CPU per connection.");
            return 0;
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "pushy-connects: %s needs a value\n", argv[i]);
            return 2;
        }
        auto v = number(argv[i], argv[i + 1]);
        ++i;
        if (a == "--connections") {
            o.connections = v;
        } else if (a == "--window") {
            o.window = v;
        } else if (a == "--request-bytes") {
            o.request = v;
        } else if (a == "--response-bytes") {
            o.response = v;
        } else if (a == "--sources") {
            o.sources = v;
        } else {
            std::fprintf(stderr, "pushy-connects: unknown option %s\n",
                         a.c_str());
            return 2;
        }
    }
    if (o.connections > 18000 || o.request > 65536 || o.response > 65536 ||
        o.sources > 200) {
        std::fprintf(stderr, "pushy-connects: --connections is at most 18000, "
                             "the sizes 65536, --sources 200\n");
        return 2;
    }
    std::vector<sockaddr_in> sources(o.sources);
    for (std::size_t k = 0; k < o.sources; ++k) {
        sources[k].sin_family = AF_INET;
        sources[k].sin_addr.s_addr = htonl(0x7f000002u + std::uint32_t(k));
    }
    raise_file_limit(o.connections);
    int lst = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (lst < 0 || bind(lst, reinterpret_cast<sockaddr*>(&a), len) != 0 ||
        listen(lst, 4096) != 0 ||
        getsockname(lst, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
        die("pushy-connects: listen");
    }
    int report[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, report) != 0) {
        die("pushy-connects: socketpair");
    }
    pid_t pid = fork();
    if (pid == 0) serve(lst, o, report[1]);
    close(lst);

    // The client: W connections in flight; each is connecting, writing or
    // reading, then idle.
    int ep = epoll_create1(0);
    std::string request(o.request, 'q');
    std::vector<char> buf(64 * 1024);
    std::vector<std::uint32_t> read_bytes(65536, 0);
    std::vector<int> fds;
    fds.reserve(o.connections);
    std::size_t started = 0, done = 0, failed = 0, in_flight = 0;
    auto start_one = [&] {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(s, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        const sockaddr_in& src = sources[started % sources.size()];
        if (s < 0 || bind(s, reinterpret_cast<const sockaddr*>(&src),
                          sizeof src)) {
            die("pushy-connects: socket");
        }
        epoll_event ev{};
        ev.events = EPOLLOUT | EPOLLIN;
        ev.data.fd = s;
        epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
        if (connect(s, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 &&
            errno != EINPROGRESS) {
            die("pushy-connects: connect");
        }
        fds.push_back(s);
        ++started;
        ++in_flight;
    };
    double cpu0 = cpu_seconds();
    std::uint64_t t0 = now_ns();
    epoll_event events[256];
    while (done + failed < o.connections) {
        while (in_flight < o.window && started < o.connections) start_one();
        int k = epoll_wait(ep, events, 256, 30'000);
        if (k <= 0) break;
        for (int e = 0; e < k; ++e) {
            int fd = events[e].data.fd;
            if (events[e].events & EPOLLOUT) {
                int err = 0;
                socklen_t l = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &l);
                epoll_event ev{};
                ev.events = EPOLLIN;
                ev.data.fd = fd;
                epoll_ctl(ep, EPOLL_CTL_MOD, fd, &ev);
                if (err != 0 ||
                    send(fd, request.data(), request.size(), MSG_NOSIGNAL) !=
                        ssize_t(request.size())) {
                    ++failed;
                    --in_flight;
                    epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
                }
                continue;
            }
            ssize_t r;
            while ((r = recv(fd, buf.data(), buf.size(), MSG_DONTWAIT)) > 0) {
                read_bytes[std::size_t(fd)] += std::uint32_t(r);
            }
            if (read_bytes[std::size_t(fd)] >= o.response) {
                epoll_ctl(ep, EPOLL_CTL_DEL, fd, nullptr);
                ++done;
                --in_flight;
            }
        }
    }
    double client_cpu = cpu_seconds() - cpu0;
    double seconds = double(now_ns() - t0) / 1e9;
    char out[64] = {};
    ssize_t n = read(report[0], out, sizeof out - 1);
    double server_cpu = n > 0 ? std::atof(out) : 0;
    if (write(report[0], "x", 1) < 0) {
        // The server is gone already.
    }
    waitpid(pid, nullptr, 0);
    for (int fd : fds) close(fd);
    std::size_t count = std::max<std::size_t>(done, 1);
    std::printf(
        "{\"connections\":%zu,\"done\":%zu,\"failed\":%zu,\"window\":%zu,"
        "\"request_bytes\":%zu,\"response_bytes\":%zu,\"seconds\":%.3f,"
        "\"connections_per_s\":%.0f,\"client_cpu_us_per_connection\":%.2f,"
        "\"server_cpu_us_per_connection\":%.2f}\n",
        o.connections, done, failed, o.window, o.request, o.response, seconds,
        double(done) / seconds, client_cpu / double(count) * 1e6,
        server_cpu / double(count) * 1e6);
    return done == o.connections ? 0 : 1;
}
