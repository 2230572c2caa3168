// pushy-loadgen: a lean idle-connection load generator for Pushy nodes.
//
// One thread, one edge-triggered epoll set. Each connection is a small
// struct and owns no buffer: reads peek into one shared scratch buffer and
// consume only whole frames (or whole response heads), so an idle
// connection costs the generator a few dozen bytes plus its socket (for
// TLS, see --tls below).
//
// Per connection: connect (paced, from a source address picked round
// robin, bound with IP_BIND_ADDRESS_NO_PORT so the port is chosen per
// destination), send the upgrade request of DESIGN.md section 3 with a
// random Sec-WebSocket-Key, check the 101 (RFC 6455 section 4.2.2), read
// the hello text frame, then stay idle answering pings with masked pongs
// (RFC 6455 sections 5.3 and 5.5.3). After --hold-s seconds, or on
// SIGTERM/SIGINT, every connection sends a close frame and is closed, and
// a report goes to stdout.
//
// With --d2d-rate, the connections send device-to-device messages during
// the hold instead of idling: open loop at R messages/s in all, round robin
// over the connections, to targets PREFIX0..PREFIX(N-1) (--d2d-to
// PREFIX:N), each message's id its intended send time (CLOCK_MONOTONIC
// ns), so the latency of its status counts from when it was due, not from
// when a late loop sent it (no coordinated omission).
//
// With --pushes, every push the devices receive is read whole: its latency
// is taken from a "ts" field in its data (CLOCK_MONOTONIC ns when the push
// was due, written by the benchmark that sends it), and a push that asks
// for an ack ("ack":true) is acked with its id. A "seq" field in its data
// (a number below 2^27) marks the push in a bit set, so that distinct
// pushes and duplicates are counted apart. While pushes arrive, a line
// {"event":"pushes","received":N,"last_ns":T} goes to stderr at most every
// 100 ms (T: CLOCK_MONOTONIC ns of the last one), so a benchmark can tell
// when every push it sent has arrived.
//
// With --reconnect, a connection that the node closes or that is reset
// (a node killed) connects again after a backoff with full jitter: a
// random wait in [0, step), the step starting at --reconnect-min-ms and
// doubling after each failed attempt up to --reconnect-max-ms; a 503
// waits at least its Retry-After (times 1 to 1.5). It sends the same token
// again. Close codes 1000, 4001 and 4002, and a 4xx at the upgrade, are
// not retried (docs/lifecycle.md, what a client should do). The report
// counts the reconnects and gives the latency from each drop to the new
// hello. A connection waiting for its next attempt is a heap entry, not a
// timer; it holds no socket.
//
// With --stats-s, a line of counters goes to stderr every S seconds of the
// hold: connections open, reconnects, pushes received and distinct.
//
// With --subscribe PATH:FIRST, the connections are subscribers of a peer
// server instead (Nchan): connection i upgrades at PATH<FIRST+i> with no
// token and no subprotocol, counts as established at the 101 (the peer
// sends no hello), and with --pushes every data frame is a push: its body
// is the message as published, whose "ts" gives the latency.
//
// With --tls, the WebSocket connections (devices and --subscribe peers)
// speak TLS (wss; OpenSSL 3, TLS 1.2 or 1.3): after the TCP connect comes
// a non-blocking TLS handshake (SNI: the --host value), then the upgrade
// and every byte after it go through SSL_write and SSL_read. The server's
// certificate is NOT verified: this is a benchmark client on loopback,
// measuring the server's cost, not whom it talks to. Every handshake is a
// full one (no session is resumed). The report adds the latency from
// connect() to the end of the TLS handshake. At the end the close frame
// goes over TLS without a TCP half-close (a FIN before close_notify reads
// as a truncation to the server), and the server's close_notify is
// answered before the socket is closed. TLS cannot peek (a record is
// decrypted whole, and SSL_peek returns one record at most), so a TLS
// connection reads until the socket is drained and keeps the incomplete
// tail of a head or frame in a buffer of its own, allocated only while
// such a tail is pending: an idle TLS connection owns its SSL object,
// whose record buffers are released while empty (SSL_MODE_RELEASE_BUFFERS),
// and nothing else.
//
// With --publish M, the process opens no WebSocket at all: it POSTs M
// messages {"ts":T,"seq":K} to PATH<k> (--publish-to PATH:N, k uniformly
// random below N) over --publish-conns keep-alive HTTP/1.1 connections,
// each with up to --pipeline requests in flight, as fast as the answers
// come (or open loop at --publish-rate), counts the answers by status code
// and reports. This is how a peer server (Nchan) takes one message per
// device.
//
// Limitations: targets loopback (127.0.0.0/8) only; at most 19,000
// connections per process (the host allows 20,000 open files); a pong or
// a d2d message that cannot be written at once counts as dropped; a
// connection dropped while --d2d-rate messages are being sent reconnects
// only once the sending is over; a {"t":"reconnect"} message is ignored
// (no make-before-break): the device connects again once the node has
// closed the connection; under --tls a write that would block leaves its
// record pending in OpenSSL, so that later writes on that connection fail
// or garble its stream (as a short send() does in plaintext); --tls does
// not apply to --publish; the SNI is an IPv4 address (RFC 6066 section 3
// allows names only), which OpenSSL sends as given.

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bench_util.hpp"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

namespace {

using pushy_bench::now_ns;
using pushy_bench::percentile;

constexpr std::size_t max_connections = 19000;
constexpr std::size_t scratch_size = 64 * 1024;
constexpr std::uint64_t max_seq = std::uint64_t{1} << 27;  // 16 MiB of bits
constexpr std::uint64_t signal_tag = ~std::uint64_t{0};
constexpr std::string_view ws_guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

// ------------------------------------------------------------ utilities

// Returns the symbolic name of an errno value ("ECONNREFUSED"), or its
// number when it has none.
std::string errno_name(int e) {
    const char* n = strerrorname_np(e);
    return n ? n : std::to_string(e);
}

// Compares two ASCII strings without case.
bool iequals(std::string_view a, std::string_view b) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
        if (std::tolower(static_cast<unsigned char>(a[i])) !=
            std::tolower(static_cast<unsigned char>(b[i]))) {
            return false;
        }
    }
    return true;
}

// True when the comma-separated header value holds `token`, without case.
bool has_token(std::string_view value, std::string_view token) {
    while (!value.empty()) {
        auto comma = value.find(',');
        auto item = value.substr(0, comma);
        while (!item.empty() && (item.front() == ' ' || item.front() == '\t'))
            item.remove_prefix(1);
        while (!item.empty() && (item.back() == ' ' || item.back() == '\t'))
            item.remove_suffix(1);
        if (iequals(item, token)) return true;
        if (comma == std::string_view::npos) break;
        value.remove_prefix(comma + 1);
    }
    return false;
}

// Calls `f(name, value)` for each "Name: value" line of `head` (header
// lines, each ending in CRLF), the value without its leading blanks.
template <class F>
void for_each_header(std::string_view head, F&& f) {
    while (!head.empty()) {
        auto eol = head.find("\r\n");
        auto line = head.substr(0, eol);
        head.remove_prefix(eol == std::string_view::npos ? head.size()
                                                         : eol + 2);
        auto colon = line.find(':');
        if (colon == std::string_view::npos) continue;
        auto value = line.substr(colon + 1);
        while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
        f(line.substr(0, colon), value);
    }
}

// Computes the SHA-1 digest of `data` (FIPS 180-4); used only for the
// Sec-WebSocket-Accept check.
std::array<std::uint8_t, 20> sha1(std::string_view data) {
    std::uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476,
                          0xC3D2E1F0};
    std::string msg(data);
    std::uint64_t bits = std::uint64_t(data.size()) * 8;
    msg += char(0x80);
    while (msg.size() % 64 != 56) msg += char(0);
    for (int i = 7; i >= 0; --i) msg += char(bits >> (i * 8));

    for (std::size_t off = 0; off < msg.size(); off += 64) {
        std::uint32_t w[80];
        for (int i = 0; i < 16; ++i) {
            auto b = [&](int k) {
                return std::uint32_t(std::uint8_t(msg[off + 4 * i + k]));
            };
            w[i] = b(0) << 24 | b(1) << 16 | b(2) << 8 | b(3);
        }
        for (int i = 16; i < 80; ++i) {
            w[i] = std::rotl(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
        }
        std::uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
        for (int i = 0; i < 80; ++i) {
            std::uint32_t f, k;
            if (i < 20) {
                f = (b & c) | (~b & d);
                k = 0x5A827999;
            } else if (i < 40) {
                f = b ^ c ^ d;
                k = 0x6ED9EBA1;
            } else if (i < 60) {
                f = (b & c) | (b & d) | (c & d);
                k = 0x8F1BBCDC;
            } else {
                f = b ^ c ^ d;
                k = 0xCA62C1D6;
            }
            std::uint32_t t = std::rotl(a, 5) + f + e + k + w[i];
            e = d;
            d = c;
            c = std::rotl(b, 30);
            b = a;
            a = t;
        }
        h[0] += a;
        h[1] += b;
        h[2] += c;
        h[3] += d;
        h[4] += e;
    }
    std::array<std::uint8_t, 20> out{};
    for (int i = 0; i < 20; ++i)
        out[i] = std::uint8_t(h[i / 4] >> (24 - 8 * (i % 4)));
    return out;
}

// Encodes bytes as padded base64 (RFC 4648 section 4).
std::string base64(const std::uint8_t* p, std::size_t n) {
    static constexpr char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    out.reserve((n + 2) / 3 * 4);
    for (std::size_t i = 0; i < n; i += 3) {
        std::uint32_t v = std::uint32_t(p[i]) << 16;
        if (i + 1 < n) v |= std::uint32_t(p[i + 1]) << 8;
        if (i + 2 < n) v |= p[i + 2];
        out += alphabet[(v >> 18) & 63];
        out += alphabet[(v >> 12) & 63];
        out += i + 1 < n ? alphabet[(v >> 6) & 63] : '=';
        out += i + 2 < n ? alphabet[v & 63] : '=';
    }
    return out;
}

// Fills `n` bytes with random bytes from the kernel; exits on failure
// since keys must not be predictable.
void random_bytes(void* p, std::size_t n) {
    auto* out = static_cast<std::uint8_t*>(p);
    while (n > 0) {
        ssize_t got = getrandom(out, n, 0);
        if (got < 0) {
            if (errno == EINTR) continue;
            std::perror("pushy-loadgen: getrandom");
            std::exit(1);
        }
        out += got;
        n -= std::size_t(got);
    }
}

// A fast generator for frame masking keys (xorshift64*), seeded from the
// kernel. Masks only need to be unpredictable to intermediaries.
class mask_source {
  public:
    // Seeds the generator from getrandom(); the state is never zero.
    mask_source() {
        random_bytes(&s_, sizeof s_);
        s_ |= 1;
    }

    // Returns the next 32-bit masking key.
    std::uint32_t next() {
        s_ ^= s_ >> 12;
        s_ ^= s_ << 25;
        s_ ^= s_ >> 27;
        return std::uint32_t((s_ * 0x2545F4914F6CDD1Dull) >> 32);
    }

  private:
    std::uint64_t s_ = 1;
};

// ------------------------------------------------------------ options

struct options {
    std::string host = "127.0.0.1";
    int port = 0;
    std::size_t connections = 0;
    std::vector<std::string> source_addrs;
    std::string tokens;
    double rate = 1000;
    double hold_s = 60;
    double handshake_timeout_s = 10;
    double close_wait_s = 2;
    bool json = false;
    double d2d_rate = 0;     // messages/s in all; 0: idle connections
    double d2d_s = 10;       // how long to send
    std::string d2d_prefix;  // targets are prefix + 0 .. prefix + (n - 1)
    std::size_t d2d_targets = 0;
    std::size_t d2d_data_bytes = 16;
    bool pushes = false;  // read pushes: latency from data.ts, ack them
    bool reconnect = false;          // connect again after a drop
    double reconnect_min_ms = 100;   // first backoff step
    double reconnect_max_ms = 5000;  // largest backoff step
    double stats_s = 0;              // 0: no stats lines
    std::string subscribe_path;  // peer subscribers at PATH<FIRST + i>
    std::size_t subscribe_first = 0;
    std::size_t publish = 0;   // messages to POST; 0: open connections
    std::string publish_path;  // POST to PATH<k>, k below publish_targets
    std::size_t publish_targets = 0;
    std::size_t publish_conns = 4;
    std::size_t pipeline = 32;  // requests in flight per connection
    double publish_rate = 0;    // messages/s; 0: as fast as answers come
    bool tls = false;           // wss: TLS under every WebSocket connection
};

// Prints the usage text to `f`.
void usage(std::FILE* f) {
    std::fputs(
        "usage: pushy-loadgen --port P --connections N --tokens FILE\n"
        "                     [--host 127.0.0.1] [--source-addrs A,B,...]\n"
        "                     [--rate R] [--hold-s S] [--json]\n"
        "                     [--handshake-timeout-s S] [--close-wait-s S]\n"
        "                     [--d2d-rate R --d2d-to PREFIX:N [--d2d-s S]\n"
        "                      [--d2d-data-bytes B]] [--pushes]\n"
        "                     [--reconnect [--reconnect-min-ms MS]\n"
        "                      [--reconnect-max-ms MS]] [--stats-s S]\n"
        "                     [--subscribe PATH:FIRST] [--tls]\n"
        "       pushy-loadgen --port P --publish M --publish-to PATH:N\n"
        "                     [--publish-conns K] [--pipeline D]\n"
        "                     [--publish-rate R] [--host H] [--json]\n"
        "\n"
        "Opens N idle WebSocket connections to a Pushy node (GET /v1/connect,\n"
        "subprotocol pushy.v1, line i of FILE as the bearer token of\n"
        "connection i), paced at R connects/s, holds them S seconds after\n"
        "the last handshake (answering pings), closes them and reports.\n"
        "Loopback (127.0.0.0/8) only; N <= 19000. SIGTERM ends the hold.\n"
        "With --d2d-rate the hold sends R d2d messages/s for S seconds\n"
        "(open loop, round robin over the connections) to PREFIX0 ..\n"
        "PREFIX(N-1) and reports the latency of their status answers.\n"
        "With --pushes it reads every push: the latency from a \"ts\"\n"
        "(CLOCK_MONOTONIC ns) in its data to its arrival, and an ack for\n"
        "each push that asks for one, and counts distinct pushes by the\n"
        "\"seq\" of their data.\n"
        "With --reconnect a dropped connection connects again with the\n"
        "same token after a jittered exponential backoff (a random wait\n"
        "below a step of MIN ms, doubling up to MAX ms; 100 and 5000).\n"
        "With --stats-s it prints a line of counters to stderr every S s.\n"
        "With --subscribe PATH:FIRST the connections subscribe to a peer\n"
        "server (Nchan): connection i upgrades at PATH<FIRST+i>, without\n"
        "token, subprotocol or hello; --pushes then counts every frame.\n"
        "With --tls the connections speak TLS (wss, TLS 1.2 or 1.3, SNI\n"
        "the --host value, full handshakes) and the report adds the\n"
        "latency to the end of the TLS handshake. The server's certificate\n"
        "is NOT verified: a benchmark client, on loopback only.\n"
        "With --publish M it POSTs M messages {\"ts\":T,\"seq\":K} to\n"
        "PATH<k> (k random below N) over K keep-alive connections, D in\n"
        "flight on each, and reports the answers by status code.\n",
        f);
}

// True when `addr` parses as an IPv4 address inside 127.0.0.0/8.
bool is_loopback(const std::string& addr, in_addr& out) {
    if (inet_pton(AF_INET, addr.c_str(), &out) != 1) return false;
    return (ntohl(out.s_addr) >> 24) == 127;
}

// Parses a number option; exits with a usage error when it is not one.
double parse_number(const char* flag, const char* text) {
    char* end = nullptr;
    double v = std::strtod(text, &end);
    if (end == text || *end != '\0' || !(v >= 0)) {
        std::fprintf(stderr, "pushy-loadgen: %s expects a number >= 0\n", flag);
        std::exit(2);
    }
    return v;
}

// Parses `text` of option `flag` as PREFIX:N into `prefix` and `n`; exits
// with a usage error when it has no colon or N is not a number.
void parse_target(const char* flag, std::string_view text, std::string& prefix,
                  std::size_t& n) {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos) {
        std::fprintf(stderr, "pushy-loadgen: %s expects PREFIX:N\n", flag);
        std::exit(2);
    }
    prefix = std::string(text.substr(0, colon));
    n = std::size_t(
        parse_number(flag, std::string(text.substr(colon + 1)).c_str()));
}

// Parses the command line into options; exits 2 on a usage error.
options parse_options(int argc, char** argv) {
    options o;
    for (int i = 1; i < argc; ++i) {
        std::string_view a = argv[i];
        if (a == "--json") {
            o.json = true;
            continue;
        }
        if (a == "--pushes") {
            o.pushes = true;
            continue;
        }
        if (a == "--reconnect") {
            o.reconnect = true;
            continue;
        }
        if (a == "--tls") {
            o.tls = true;
            continue;
        }
        if (a == "-h" || a == "--help") {
            usage(stdout);
            std::exit(0);
        }
        if (i + 1 >= argc) {
            std::fprintf(stderr, "pushy-loadgen: %s needs a value\n", argv[i]);
            usage(stderr);
            std::exit(2);
        }
        const char* v = argv[++i];
        if (a == "--host") {
            o.host = v;
        } else if (a == "--port") {
            o.port = int(parse_number(argv[i - 1], v));
        } else if (a == "--connections") {
            o.connections = std::size_t(parse_number(argv[i - 1], v));
        } else if (a == "--source-addrs") {
            std::string_view list = v;
            while (!list.empty()) {
                auto comma = list.find(',');
                if (comma != 0) {
                    o.source_addrs.emplace_back(list.substr(0, comma));
                }
                if (comma == std::string_view::npos) break;
                list.remove_prefix(comma + 1);
            }
        } else if (a == "--tokens") {
            o.tokens = v;
        } else if (a == "--rate") {
            o.rate = parse_number(argv[i - 1], v);
        } else if (a == "--hold-s") {
            o.hold_s = parse_number(argv[i - 1], v);
        } else if (a == "--handshake-timeout-s") {
            o.handshake_timeout_s = parse_number(argv[i - 1], v);
        } else if (a == "--close-wait-s") {
            o.close_wait_s = parse_number(argv[i - 1], v);
        } else if (a == "--d2d-rate") {
            o.d2d_rate = parse_number(argv[i - 1], v);
        } else if (a == "--d2d-s") {
            o.d2d_s = parse_number(argv[i - 1], v);
        } else if (a == "--reconnect-min-ms") {
            o.reconnect_min_ms = parse_number(argv[i - 1], v);
        } else if (a == "--reconnect-max-ms") {
            o.reconnect_max_ms = parse_number(argv[i - 1], v);
        } else if (a == "--stats-s") {
            o.stats_s = parse_number(argv[i - 1], v);
        } else if (a == "--d2d-data-bytes") {
            o.d2d_data_bytes = std::size_t(parse_number(argv[i - 1], v));
        } else if (a == "--d2d-to") {
            parse_target(argv[i - 1], v, o.d2d_prefix, o.d2d_targets);
        } else if (a == "--subscribe") {
            parse_target(argv[i - 1], v, o.subscribe_path, o.subscribe_first);
        } else if (a == "--publish") {
            o.publish = std::size_t(parse_number(argv[i - 1], v));
        } else if (a == "--publish-to") {
            parse_target(argv[i - 1], v, o.publish_path, o.publish_targets);
        } else if (a == "--publish-conns") {
            o.publish_conns = std::size_t(parse_number(argv[i - 1], v));
        } else if (a == "--pipeline") {
            o.pipeline = std::size_t(parse_number(argv[i - 1], v));
        } else if (a == "--publish-rate") {
            o.publish_rate = parse_number(argv[i - 1], v);
        } else {
            std::fprintf(stderr, "pushy-loadgen: unknown option %s\n",
                         argv[i - 1]);
            usage(stderr);
            std::exit(2);
        }
    }
    auto bad = [](const char* what) {
        std::fprintf(stderr, "pushy-loadgen: %s\n", what);
        std::exit(2);
    };
    if (o.port <= 0 || o.port > 65535) bad("--port must be 1-65535");
    if (o.publish > 0) {
        // The publisher speaks plain HTTP/1.1 only.
        if (o.tls) bad("--tls does not apply to --publish");
        if (o.publish_targets == 0) {
            bad("--publish needs --publish-to PATH:N with N >= 1");
        }
        if (o.publish_conns == 0 || o.publish_conns > 1000) {
            bad("--publish-conns must be 1-1000");
        }
        if (o.pipeline == 0 || o.pipeline > 4096) {
            bad("--pipeline must be 1-4096");
        }
        return o;
    }
    if (o.connections == 0) bad("--connections must be at least 1");
    if (o.connections > max_connections) {
        bad("--connections must be at most 19000 per process "
            "(run several processes)");
    }
    if (o.tokens.empty() && o.subscribe_path.empty()) {
        bad("--tokens FILE (or --subscribe PATH:FIRST) is required");
    }
    if (!o.tokens.empty() && !o.subscribe_path.empty()) {
        bad("--tokens and --subscribe exclude each other");
    }
    if (o.rate <= 0) bad("--rate must be above 0");
    if (o.d2d_rate > 0 && o.d2d_targets == 0) {
        bad("--d2d-rate needs --d2d-to PREFIX:N with N >= 1");
    }
    if (o.d2d_data_bytes > 4096) bad("--d2d-data-bytes must be at most 4096");
    if (o.reconnect_min_ms <= 0 || o.reconnect_max_ms < o.reconnect_min_ms ||
        o.reconnect_max_ms > 3'600'000) {
        bad("--reconnect-min-ms must be above 0 and at most "
            "--reconnect-max-ms, which must be at most 3600000");
    }
    if (o.stats_s > 0 && o.stats_s < 0.01) {
        bad("--stats-s must be 0 or at least 0.01");
    }
    return o;
}

// ------------------------------------------------------------ tokens

// The token file, mapped read-only, and a view of each line.
class token_file {
  public:
    // Maps `path` and indexes its first `n` lines; exits on failure. An
    // empty path (peer subscribers) maps nothing.
    token_file(const std::string& path, std::size_t n) {
        if (path.empty()) return;
        int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        struct stat st{};
        if (fd < 0 || fstat(fd, &st) != 0 || st.st_size == 0) {
            std::fprintf(stderr, "pushy-loadgen: cannot read %s\n",
                         path.c_str());
            std::exit(2);
        }
        size_ = std::size_t(st.st_size);
        void* p = mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
        ::close(fd);
        if (p == MAP_FAILED) {
            std::perror("pushy-loadgen: mmap");
            std::exit(2);
        }
        data_ = static_cast<const char*>(p);
        std::string_view all(data_, size_);
        lines_.reserve(n);
        while (lines_.size() < n && !all.empty()) {
            auto nl = all.find('\n');
            auto line = all.substr(0, nl);
            if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
            lines_.push_back(line);
            if (nl == std::string_view::npos) break;
            all.remove_prefix(nl + 1);
        }
        if (lines_.size() < n) {
            std::fprintf(stderr,
                         "pushy-loadgen: %s has %zu lines, %zu needed\n",
                         path.c_str(), lines_.size(), n);
            std::exit(2);
        }
        for (std::size_t i = 0; i < n; ++i) {
            // The request length is kept in 16 bits; real tokens are far
            // below the node's 8 KiB header limit anyway.
            if (lines_[i].size() > 32768) {
                std::fprintf(stderr,
                             "pushy-loadgen: line %zu of %s is longer than "
                             "32768 bytes\n",
                             i + 1, path.c_str());
                std::exit(2);
            }
            if (lines_[i].empty()) {
                std::fprintf(stderr,
                             "pushy-loadgen: line %zu of %s is "
                             "empty\n",
                             i + 1, path.c_str());
                std::exit(2);
            }
        }
    }

    token_file(const token_file&) = delete;
    token_file& operator=(const token_file&) = delete;

    ~token_file() {
        if (data_) munmap(const_cast<char*>(data_), size_);
    }

    // Returns the token of connection `i`.
    std::string_view operator[](std::size_t i) const { return lines_[i]; }

  private:
    const char* data_ = nullptr;
    std::size_t size_ = 0;
    std::vector<std::string_view> lines_;
};

// ------------------------------------------------------------ generator

enum class state : std::uint8_t {
    pending,        // not started yet
    connecting,     // TCP connect in progress
    tls_handshake,  // TLS handshake in progress (--tls)
    sending,        // upgrade request partly written
    reading_101,    // waiting for the response head
    reading_hello,  // waiting for the hello frame
    idle,           // open, answering pings
    closing,        // close frame sent, waiting for the peer's FIN
    done,           // socket closed
    backoff,        // dropped, waiting for its next attempt (--reconnect)
};

// One connection. While idle only fd, st and skip matter.
struct conn {
    int fd = -1;
    state st = state::pending;
    std::uint8_t attempt = 0;   // failed reconnect attempts since the drop
    std::uint16_t sent = 0;     // request bytes written so far
    std::uint32_t skip = 0;     // data-frame payload bytes still to discard
    std::uint64_t t0_ns = 0;    // when connect() was called
    std::uint64_t lost_ns = 0;  // when it dropped; 0 while never dropped
    std::uint8_t key[16]{};     // Sec-WebSocket-Key bytes, until the 101
};

// Frees an SSL object (a stateless deleter keeps the pointer 8 bytes).
struct ssl_free {
    void operator()(SSL* ssl) const { SSL_free(ssl); }
};

// The TLS side of one connection under --tls, kept apart from `conn` so a
// plaintext run pays nothing for it. The tail holds the bytes of a head or
// frame not yet whole, and exists only while they do: TLS cannot peek.
struct tls_link {
    std::unique_ptr<SSL, ssl_free> ssl;  // from the TCP connect to the close
    std::unique_ptr<char[]> tail;        // incomplete head or frame, or null
    std::uint32_t tail_len = 0;          // below scratch_size
};

// Returns the reason of a failed TLS call that returned `ret` on `ssl`
// ("tls:" + OpenSSL's reason, or tls:eof, tls:syscall:ERRNO, ...), and
// empties the thread's OpenSSL error queue. Call it right after the call,
// before errno changes.
std::string tls_error(SSL* ssl, int ret) {
    int saved_errno = errno;
    int e = SSL_get_error(ssl, ret);
    unsigned long code = ERR_peek_error();
    std::string why = "tls:";
    if (e == SSL_ERROR_WANT_READ) {
        why += "want_read";
    } else if (e == SSL_ERROR_WANT_WRITE) {
        why += "want_write";
    } else if (e == SSL_ERROR_ZERO_RETURN) {
        why += "close_notify";
    } else if (e == SSL_ERROR_SYSCALL && saved_errno != 0) {
        why += "syscall:" + errno_name(saved_errno);
    } else if (code == 0 ||
               ERR_GET_REASON(code) == SSL_R_UNEXPECTED_EOF_WHILE_READING) {
        why += "eof";  // the peer closed TCP without a close_notify
    } else if (const char* r = ERR_reason_error_string(code)) {
        // "wrong version number" becomes wrong_version_number, in the
        // style of the other reasons.
        for (; *r; ++r) why += *r == ' ' ? '_' : *r;
    } else {
        why += "error_" + std::to_string(ERR_GET_REASON(code));
    }
    ERR_clear_error();
    return why;
}

// Empties the thread's OpenSSL error queue and errno before a TLS call, so
// that SSL_get_error and tls_error judge that call alone.
void tls_clear() {
    ERR_clear_error();
    errno = 0;
}

class load_generator {
  public:
    // Prepares the epoll set, the signal fd and the connection table.
    explicit load_generator(const options& o)
        : opt_(o), tokens_(o.tokens, o.connections), conns_(o.connections) {
        if (!is_loopback(opt_.host, dst_.sin_addr)) {
            die_usage("--host must be an IPv4 address in 127.0.0.0/8");
        }
        dst_.sin_family = AF_INET;
        dst_.sin_port = htons(std::uint16_t(opt_.port));
        if (opt_.source_addrs.empty()) opt_.source_addrs.push_back(opt_.host);
        for (auto& a : opt_.source_addrs) {
            sockaddr_in s{};
            s.sin_family = AF_INET;
            if (!is_loopback(a, s.sin_addr)) {
                die_usage(
                    "--source-addrs must be IPv4 addresses in "
                    "127.0.0.0/8");
            }
            srcs_.push_back(s);
        }
        host_header_ = opt_.host + ":" + std::to_string(opt_.port);
        raise_file_limit();

        ep_ = epoll_create1(EPOLL_CLOEXEC);
        sigset_t set;
        sigemptyset(&set);
        sigaddset(&set, SIGTERM);
        sigaddset(&set, SIGINT);
        sigprocmask(SIG_BLOCK, &set, nullptr);
        sig_ = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = signal_tag;
        if (ep_ < 0 || sig_ < 0 || epoll_ctl(ep_, EPOLL_CTL_ADD, sig_, &ev)) {
            std::perror("pushy-loadgen: epoll/signalfd");
            std::exit(1);
        }
        lat_101_.reserve(opt_.connections);
        lat_hello_.reserve(opt_.connections);
        scratch_.resize(scratch_size);
        if (opt_.tls) start_tls_context();
    }

    // Runs the connect phase, the hold and the close phase; returns the
    // process exit code (0 when every connection was established).
    int run() {
        connect_phase();
        if (!stop_) hold_phase();
        close_phase();
        report();
        return failed_total_ == 0 ? 0 : 1;
    }

  private:
    // Exits with a usage error message.
    [[noreturn]] static void die_usage(const char* what) {
        std::fprintf(stderr, "pushy-loadgen: %s\n", what);
        std::exit(2);
    }

    // Creates the client context of --tls: TLS 1.2 or 1.3, no certificate
    // verification (a benchmark client on loopback), record buffers
    // released while empty so that an idle connection keeps none.
    void start_tls_context() {
        ctx_.reset(SSL_CTX_new(TLS_client_method()));
        if (!ctx_ ||
            !SSL_CTX_set_min_proto_version(ctx_.get(), TLS1_2_VERSION)) {
            std::fprintf(stderr, "pushy-loadgen: cannot create the TLS "
                                 "context\n");
            std::exit(1);
        }
        SSL_CTX_set_verify(ctx_.get(), SSL_VERIFY_NONE, nullptr);
        // The upgrade request is rebuilt for each attempt to write it, so
        // a retried SSL_write may come from another address.
        SSL_CTX_set_mode(ctx_.get(), SSL_MODE_RELEASE_BUFFERS |
                                         SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
        tls_.resize(conns_.size());
        lat_tls_.reserve(opt_.connections);
        // OpenSSL writes with write(), not send(MSG_NOSIGNAL): a write to
        // a reset connection must fail with EPIPE, not kill the process.
        signal(SIGPIPE, SIG_IGN);
    }

    // Raises the soft open-file limit to what N connections need.
    void raise_file_limit() {
        rlimit rl{};
        getrlimit(RLIMIT_NOFILE, &rl);
        rlim_t need = opt_.connections + 32;
        if (rl.rlim_cur < need) {
            rl.rlim_cur = std::min(need, rl.rlim_max);
            setrlimit(RLIMIT_NOFILE, &rl);
        }
        if (rl.rlim_cur < need) {
            std::fprintf(stderr,
                         "pushy-loadgen: open-file limit %llu is "
                         "below the %llu needed\n",
                         (unsigned long long)rl.rlim_cur,
                         (unsigned long long)need);
            std::exit(2);
        }
    }

    // Waits for events up to `timeout_ms` and dispatches them.
    void poll_once(int timeout_ms) {
        poll_once_ns(std::uint64_t(timeout_ms) * 1'000'000u);
    }

    // Waits for events up to `timeout_ns` (epoll_pwait2: finer than a
    // millisecond, for pacing) and dispatches them.
    void poll_once_ns(std::uint64_t timeout_ns) {
        epoll_event events[256];
        timespec ts{time_t(timeout_ns / 1'000'000'000u),
                    long(timeout_ns % 1'000'000'000u)};
        int n = epoll_pwait2(ep_, events, 256, &ts, nullptr);
        for (int k = 0; k < n; ++k) {
            if (events[k].data.u64 == signal_tag) {
                signalfd_siginfo si;
                while (read(sig_, &si, sizeof si) > 0) {
                }
                stop_ = true;
                continue;
            }
            on_event(std::size_t(events[k].data.u64), events[k].events);
        }
    }

    // Starts connections on schedule until all are started and none is
    // still in its handshake, or a signal arrives.
    void connect_phase() {
        t_begin_ = now_ns();
        std::uint64_t last_scan = t_begin_;
        double gap_ns = 1e9 / opt_.rate;
        while (!stop_) {
            std::uint64_t now = now_ns();
            // Open loop: connection i is due at t_begin + i / rate; a
            // late loop catches up, a bounded burst at a time.
            int burst = 0;
            while (started_ < conns_.size() && burst < 256 &&
                   t_begin_ + std::uint64_t(double(started_) * gap_ns) <= now) {
                start_connect(started_++);
                ++burst;
            }
            run_reconnects(now);
            if (now - last_scan >= 100'000'000u) {
                expire_handshakes(now);
                last_scan = now;
            }
            if (started_ == conns_.size() && in_handshake_ == 0) break;
            int timeout = 100;
            if (started_ < conns_.size()) {
                auto due = t_begin_ + std::uint64_t(double(started_) * gap_ns);
                timeout =
                    due <= now ? 0 : int((due - now + 999'999) / 1'000'000);
                timeout = std::min(timeout, 100);
            }
            poll_once_ns(std::min(std::uint64_t(timeout) * 1'000'000u,
                                  next_reconnect_in(now)));
        }
        t_connected_ = now_ns();
        std::fprintf(stderr,
                     "{\"event\":\"ready\",\"connected\":%zu,\"failed\":%zu}"
                     "\n",
                     established_, failed_total_);
        std::fflush(stderr);
    }

    // Holds the connections for --hold-s seconds or until a signal; with
    // --d2d-rate, sends the d2d messages first.
    void hold_phase() {
        if (opt_.d2d_rate > 0) d2d_phase();
        std::uint64_t end = now_ns() + std::uint64_t(opt_.hold_s * 1e9);
        std::uint64_t last_scan = now_ns();
        auto stats_gap = std::uint64_t(opt_.stats_s * 1e9);
        std::uint64_t next_stats = last_scan + stats_gap;
        for (;;) {
            std::uint64_t now = now_ns();
            if (stop_ || now >= end) break;
            run_reconnects(now);
            if (in_handshake_ > 0 && now - last_scan >= 100'000'000u) {
                expire_handshakes(now);
                last_scan = now;
            }
            if (stats_gap > 0 && now >= next_stats) {
                print_stats(now);
                next_stats += stats_gap;
            }
            // Wake for the end, the next reconnect, the handshake scan and
            // the next stats line, whichever comes first.
            std::uint64_t wait = std::min(end - now, next_reconnect_in(now));
            if (in_handshake_ > 0) {
                wait = std::min<std::uint64_t>(wait, 100'000'000u);
            }
            if (stats_gap > 0) {
                wait = std::min(wait, next_stats - std::min(next_stats, now));
            }
            if (opt_.pushes) {
                // While pushes are counted, wake up often enough to say
                // the last count soon after the last push.
                say_pushes(now);
                wait = std::min<std::uint64_t>(wait, 100'000'000u);
            }
            poll_once_ns(wait);
        }
        t_hold_end_ = now_ns();
    }

    // Starts the reconnect attempts that are due, a bounded burst at a
    // time.
    void run_reconnects(std::uint64_t now) {
        for (int burst = 0; burst < 256 && !retry_.empty(); ++burst) {
            auto [due, i] = retry_.top();
            if (due > now) break;
            retry_.pop();
            conn& c = conns_[i];
            c.sent = 0;
            c.skip = 0;
            ++reconnect_attempts_;
            start_connect(i);
        }
    }

    // Nanoseconds until the next reconnect attempt is due (at most 1 s).
    std::uint64_t next_reconnect_in(std::uint64_t now) const {
        if (retry_.empty()) return 1'000'000'000u;
        auto due = retry_.top().first;
        if (due <= now) return 0;
        return std::min<std::uint64_t>(due - now, 1'000'000'000u);
    }

    // Puts connection `c` in backoff: its next attempt is due after a
    // random wait below the current step (full jitter), and at least
    // `at_least_ms` times 1 to 1.5 (a Retry-After). Doubles the step.
    void schedule_reconnect(conn& c, std::uint64_t now, double at_least_ms) {
        double step = opt_.reconnect_min_ms * std::ldexp(1.0, c.attempt);
        step = std::min(step, opt_.reconnect_max_ms);
        double wait_ms = step * uniform();
        if (at_least_ms > 0) {
            wait_ms = std::max(wait_ms, at_least_ms * (1 + 0.5 * uniform()));
        }
        if (c.attempt < 62) ++c.attempt;
        c.st = state::backoff;
        retry_.emplace(now + std::uint64_t(wait_ms * 1e6),
                       std::uint32_t(&c - conns_.data()));
    }

    // Returns a random number in [0, 1).
    double uniform() { return double(masks_.next()) / 4294967296.0; }

    // Prints a line of counters to stderr (--stats-s).
    void print_stats(std::uint64_t now) {
        std::fprintf(stderr,
                     "{\"event\":\"stats\",\"t_ns\":%llu,\"open\":%zu,"
                     "\"reconnects\":%zu,\"dropped\":%zu,\"waiting\":%zu,"
                     "\"pushes\":%zu,\"distinct\":%zu}\n",
                     (unsigned long long)now,
                     established_ + reconnects_ - dropped_total_, reconnects_,
                     dropped_total_, retry_.size(), pushes_received_,
                     pushes_distinct_);
        std::fflush(stderr);
    }

    // Prints the pushes received so far to stderr when the count changed,
    // at most every 100 ms.
    void say_pushes(std::uint64_t now) {
        if (pushes_received_ == pushes_said_ ||
            now < t_pushes_said_ + 100'000'000u) {
            return;
        }
        std::fprintf(stderr,
                     "{\"event\":\"pushes\",\"received\":%zu,"
                     "\"last_ns\":%llu}\n",
                     pushes_received_, (unsigned long long)last_push_ns_);
        std::fflush(stderr);
        pushes_said_ = pushes_received_;
        t_pushes_said_ = now;
    }

    // Sends d2d messages open loop for --d2d-s seconds, then waits up to
    // 5 s for the statuses still due.
    void d2d_phase() {
        std::string data = "\"" + std::string(
                                      opt_.d2d_data_bytes > 2
                                          ? opt_.d2d_data_bytes - 2
                                          : 0,
                                      'x') +
                           "\"";
        d2d_lat_.reserve(std::size_t(opt_.d2d_rate * opt_.d2d_s) + 16);
        double gap_ns = 1e9 / opt_.d2d_rate;
        std::uint64_t total = std::uint64_t(opt_.d2d_rate * opt_.d2d_s);
        t_d2d_begin_ = now_ns();
        std::size_t next_conn = 0;
        std::string frame;
        while (!stop_ && d2d_sent_ + d2d_dropped_ < total) {
            std::uint64_t now = now_ns();
            int burst = 0;
            std::uint64_t k = d2d_sent_ + d2d_dropped_;
            while (k < total && burst < 64) {
                std::uint64_t due = t_d2d_begin_ + std::uint64_t(double(k) * gap_ns);
                if (due > now) break;
                // The next open connection, round robin.
                std::size_t tries = 0;
                while (conns_[next_conn].st != state::idle &&
                       tries++ < conns_.size()) {
                    next_conn = (next_conn + 1) % conns_.size();
                }
                conn& c = conns_[next_conn];
                next_conn = (next_conn + 1) % conns_.size();
                if (c.st != state::idle) {
                    stop_ = true;  // nothing left to send on
                    break;
                }
                send_d2d(c, due, k % opt_.d2d_targets, data, frame);
                ++k;
                ++burst;
            }
            std::uint64_t timeout = 0;
            if (k < total) {
                auto due = t_d2d_begin_ + std::uint64_t(double(k) * gap_ns);
                timeout = due <= now ? 0 : due - now;
            }
            poll_once_ns(std::min<std::uint64_t>(timeout, 100'000'000u));
        }
        t_d2d_end_ = now_ns();
        std::uint64_t wait_end = t_d2d_end_ + 5'000'000'000u;
        while (!stop_ && d2d_answered_ < d2d_sent_ && now_ns() < wait_end) {
            poll_once(10);
        }
    }

    // Writes one masked d2d text frame on `c` (RFC 6455 section 5.3);
    // `frame` is a scratch buffer kept across calls.
    void send_d2d(conn& c, std::uint64_t due, std::size_t target,
                  const std::string& data, std::string& frame) {
        std::string& payload = d2d_payload_;
        payload = "{\"t\":\"d2d\",\"id\":\"";
        payload += std::to_string(due);
        payload += "\",\"to\":\"";
        payload += opt_.d2d_prefix;
        payload += std::to_string(target);
        payload += "\",\"data\":";
        payload += data;
        payload += "}";
        text_frame(frame, payload);
        if (!send_whole(c, frame.data(), frame.size())) {
            ++d2d_dropped_;
            return;
        }
        ++d2d_sent_;
    }

    // Writes `n` bytes on `c` at once: one send() on a plain connection,
    // one SSL_write under --tls. Returns false when they could not all be
    // written, with the reason in `why` when given.
    bool send_whole(conn& c, const void* p, std::size_t n,
                    std::string* why = nullptr) {
        if (tls_.empty()) {
            if (send(c.fd, p, n, MSG_NOSIGNAL) == ssize_t(n)) return true;
            if (why) *why = errno_name(errno);
            return false;
        }
        SSL* ssl = tls_of(c).ssl.get();
        tls_clear();
        int r = SSL_write(ssl, p, int(n));
        if (r == int(n)) return true;
        std::string e = tls_error(ssl, r);
        if (why) *why = std::move(e);
        return false;
    }

    // Returns the TLS side of connection `c` (under --tls only).
    tls_link& tls_of(const conn& c) {
        return tls_[std::size_t(&c - conns_.data())];
    }

    // Makes `frame` one masked text frame of `payload` (RFC 6455 section
    // 5.3); payloads of up to 64 KiB.
    void text_frame(std::string& frame, std::string_view payload) {
        frame.clear();
        frame += char(0x81);
        if (payload.size() < 126) {
            frame += char(0x80 | payload.size());
        } else {
            frame += char(0x80 | 126);
            frame += char(payload.size() >> 8);
            frame += char(payload.size() & 0xff);
        }
        std::uint32_t mask = masks_.next();
        char m[4];
        std::memcpy(m, &mask, 4);
        frame.append(m, 4);
        for (std::size_t k = 0; k < payload.size(); ++k) {
            frame += char(payload[k] ^ m[k % 4]);
        }
    }

    // Reads a push: records the latency from its data's "ts" and acks it
    // when it asks for an ack (its id is echoed as it came, number or
    // string).
    void on_push(conn& c, std::string_view payload) {
        bool peer = !opt_.subscribe_path.empty();
        if (!peer && payload.find("\"t\":\"push\"") == std::string_view::npos) {
            ++frames_ignored_;
            return;
        }
        std::uint64_t now = now_ns();
        ++pushes_received_;
        auto seq_at = payload.find("\"seq\":");
        if (seq_at != std::string_view::npos) {
            std::uint64_t seq = max_seq;
            auto v = payload.substr(seq_at + 6);
            std::from_chars(v.data(), v.data() + v.size(), seq);
            if (seq < max_seq) {
                if (seen_.size() <= seq / 64) seen_.resize(seq / 64 + 1024);
                std::uint64_t bit = std::uint64_t{1} << (seq % 64);
                if (seen_[seq / 64] & bit) {
                    ++pushes_duplicate_;
                } else {
                    seen_[seq / 64] |= bit;
                    ++pushes_distinct_;
                }
            }
        }
        last_push_ns_ = now;
        auto ts_at = payload.find("\"ts\":");
        if (ts_at != std::string_view::npos) {
            std::uint64_t due = 0;
            auto ts = payload.substr(ts_at + 5);
            std::from_chars(ts.data(), ts.data() + ts.size(), due);
            if (due && now >= due) {
                push_lat_.push_back(std::uint32_t(
                    std::min<std::uint64_t>((now - due) / 1000, UINT32_MAX)));
            }
        }
        if (peer) return;  // a peer's message is never acked
        if (payload.find("\"ack\":true") == std::string_view::npos) return;
        auto id_at = payload.find("\"id\":");
        if (id_at == std::string_view::npos) return;
        auto id = payload.substr(id_at + 5);
        auto end = id.front() == '"' ? id.find('"', 1) + 1
                                     : id.find_first_of(",}");
        if (end == std::string_view::npos || end == 0) return;
        std::string& msg = ack_payload_;
        msg = "{\"t\":\"ack\",\"id\":";
        msg += id.substr(0, end);
        msg += "}";
        std::string& frame = ack_frame_;
        text_frame(frame, msg);
        if (send_whole(c, frame.data(), frame.size())) ++pushes_acked_;
    }

    // Reads a status answer: its id (the due time) and code.
    void on_status(std::string_view payload) {
        auto id_at = payload.find("\"id\":\"");
        auto code_at = payload.find("\"code\":");
        if (payload.find("\"t\":\"status\"") == std::string_view::npos ||
            id_at == std::string_view::npos ||
            code_at == std::string_view::npos) {
            ++frames_ignored_;
            return;
        }
        std::uint64_t due = 0;
        auto id = payload.substr(id_at + 6);
        std::from_chars(id.data(), id.data() + id.size(), due);
        int code = 0;
        auto cs = payload.substr(code_at + 7);
        std::from_chars(cs.data(), cs.data() + cs.size(), code);
        std::uint64_t now = now_ns();
        ++d2d_answered_;
        ++d2d_codes_[code];
        if (code == 200 && now >= due) {
            d2d_lat_.push_back(std::uint32_t(
                std::min<std::uint64_t>((now - due) / 1000, UINT32_MAX)));
        }
    }

    // Sends a close frame (1000) on every open connection, waits up to
    // --close-wait-s for the peers to close, then closes what is left.
    void close_phase() {
        if (t_hold_end_ == 0) t_hold_end_ = now_ns();
        closing_all_ = true;
        std::size_t waiting = 0;
        for (std::size_t i = 0; i < conns_.size(); ++i) {
            conn& c = conns_[i];
            if (c.st == state::backoff || (c.fd >= 0 && c.lost_ns != 0)) {
                ++reconnect_waiting_at_end_;
            }
            if (c.st == state::idle) {
                ++open_at_end_;
                std::uint8_t frame[8] = {0x88, 0x82};
                std::uint32_t mask = masks_.next();
                std::memcpy(frame + 2, &mask, 4);
                frame[6] = std::uint8_t(0x03 ^ frame[2]);  // 1000 = 0x03e8
                frame[7] = std::uint8_t(0xe8 ^ frame[3]);
                // Under TLS no half-close: a FIN before any close_notify
                // would read as a truncation to the server, which closes
                // first anyway (RFC 6455 section 7.1.1).
                if (send_whole(c, frame, sizeof frame) &&
                    (!tls_.empty() || shutdown(c.fd, SHUT_WR) == 0)) {
                    c.st = state::closing;
                    ++waiting;
                    continue;
                }
                ++closed_forced_;
                close_fd(c);
            } else if (c.fd >= 0) {
                // Stopped by a signal in the middle of its handshake.
                fail(c, "interrupted");
            }
        }
        closing_ = waiting;
        std::uint64_t end = now_ns() + std::uint64_t(opt_.close_wait_s * 1e9);
        stop_ = false;
        while (closing_ > 0 && !stop_) {
            std::uint64_t now = now_ns();
            if (now >= end) break;
            poll_once(int(std::min<std::uint64_t>(
                (end - now + 999'999) / 1'000'000, 100)));
        }
        for (auto& c : conns_) {
            if (c.fd >= 0) {
                ++closed_forced_;
                close_fd(c);
            }
        }
    }

    // Creates, binds and connects the socket of connection `i`.
    void start_connect(std::size_t i) {
        conn& c = conns_[i];
        c.t0_ns = now_ns();
        ++in_handshake_;
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return fail(c, "socket:" + errno_name(errno));
        c.fd = fd;
        int one = 1;
        // Let connect() pick the port per destination, so each source
        // address gives a full ephemeral range per node port.
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        const sockaddr_in& src = srcs_[i % srcs_.size()];
        if (bind(fd, reinterpret_cast<const sockaddr*>(&src), sizeof src)) {
            return fail(c, "bind:" + errno_name(errno));
        }
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
        ev.data.u64 = i;
        if (epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev)) {
            return fail(c, "epoll:" + errno_name(errno));
        }
        random_bytes(c.key, sizeof c.key);
        c.st = state::connecting;
        if (connect(fd, reinterpret_cast<const sockaddr*>(&dst_),
                    sizeof dst_) != 0 &&
            errno != EINPROGRESS) {
            return fail(c, "connect:" + errno_name(errno));
        }
    }

    // Dispatches one epoll event of connection `i`.
    void on_event(std::size_t i, std::uint32_t events) {
        conn& c = conns_[i];
        if (c.fd < 0) return;
        if (c.st == state::tls_handshake) {
            // A handshake may wait to read as well as to write: any event
            // moves it on.
            on_writable(c);
            if (c.fd < 0 || c.st == state::tls_handshake ||
                c.st == state::sending) {
                return;
            }
        } else if (c.st == state::connecting || c.st == state::sending) {
            if (!(events & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
            on_writable(c);
            if (c.fd < 0 || c.st == state::sending ||
                c.st == state::tls_handshake) {
                return;
            }
        }
        on_readable(c);
    }

    // Finishes the connect (and under --tls the TLS handshake) and writes
    // (the rest of) the upgrade request.
    void on_writable(conn& c) {
        if (c.st == state::connecting) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err != 0) return fail(c, "connect:" + errno_name(err));
            c.st = state::sending;
            if (!tls_.empty()) start_tls(c);
        }
        if (c.st == state::tls_handshake && !tls_handshake(c)) return;
        std::string req = request(std::size_t(&c - conns_.data()), c);
        if (!tls_.empty()) {
            // SSL_write writes the whole request or nothing: a retry
            // repeats it (the same bytes) until it goes.
            SSL* ssl = tls_of(c).ssl.get();
            tls_clear();
            int n = SSL_write(ssl, req.data(), int(req.size()));
            if (n <= 0) {
                int e = SSL_get_error(ssl, n);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    ERR_clear_error();
                    return;
                }
                return fail(c, tls_error(ssl, n));
            }
            c.sent = std::uint16_t(req.size());
        }
        while (c.sent < req.size()) {
            ssize_t n = send(c.fd, req.data() + c.sent, req.size() - c.sent,
                             MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) return;
                return fail(c, "send:" + errno_name(errno));
            }
            c.sent = std::uint16_t(c.sent + n);
        }
        // Only reads matter from now on.
        epoll_event ev{};
        ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
        ev.data.u64 = std::size_t(&c - conns_.data());
        epoll_ctl(ep_, EPOLL_CTL_MOD, c.fd, &ev);
        c.st = state::reading_101;
    }

    // Gives connection `c`, whose TCP connect is done, its SSL object and
    // starts the TLS handshake (state tls_handshake).
    void start_tls(conn& c) {
        // The client's Finished and the upgrade request are two writes:
        // without TCP_NODELAY the second waits for the first's (delayed)
        // ACK, 40 ms on Linux. Browsers set it too.
        int one = 1;
        setsockopt(c.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        tls_link& t = tls_of(c);
        t.ssl.reset(SSL_new(ctx_.get()));
        // The SNI is the --host address: not a name as RFC 6066 wants,
        // but what the benchmark connects to; OpenSSL sends it as given.
        if (!t.ssl || !SSL_set_fd(t.ssl.get(), c.fd) ||
            !SSL_set_tlsext_host_name(t.ssl.get(), opt_.host.c_str())) {
            ERR_clear_error();
            return fail(c, "tls:setup");
        }
        SSL_set_connect_state(t.ssl.get());
        c.st = state::tls_handshake;
    }

    // Moves the TLS handshake of `c` on; returns true once it is done
    // (state sending), false while it waits for the socket or failed.
    bool tls_handshake(conn& c) {
        SSL* ssl = tls_of(c).ssl.get();
        tls_clear();
        int r = SSL_connect(ssl);
        if (r != 1) {
            int e = SSL_get_error(ssl, r);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                ERR_clear_error();
                return false;
            }
            fail(c, tls_error(ssl, r));
            return false;
        }
        if (c.lost_ns == 0) {
            lat_tls_.push_back(std::uint32_t((now_ns() - c.t0_ns) / 1000));
        }
        c.st = state::sending;
        return true;
    }

    // Builds the upgrade request of connection `i` (DESIGN.md section 3),
    // or with --subscribe the plain one of a peer's subscriber.
    std::string request(std::size_t i, const conn& c) const {
        std::string r;
        if (!opt_.subscribe_path.empty()) {
            r += "GET ";
            r += opt_.subscribe_path;
            r += std::to_string(opt_.subscribe_first + i);
            r += " HTTP/1.1\r\nHost: ";
            r += host_header_;
            r += "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: ";
            r += base64(c.key, sizeof c.key);
            r += "\r\nSec-WebSocket-Version: 13\r\n\r\n";
            return r;
        }
        auto token = tokens_[i];
        r.reserve(256 + token.size());
        r += "GET /v1/connect HTTP/1.1\r\nHost: ";
        r += host_header_;
        r += "\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             "Sec-WebSocket-Key: ";
        r += base64(c.key, sizeof c.key);
        r += "\r\nSec-WebSocket-Version: 13\r\n"
             "Sec-WebSocket-Protocol: pushy.v1\r\n"
             "Authorization: Bearer ";
        r += token;
        r += "\r\n\r\n";
        return r;
    }

    // Reads what connection `c` has: peeks into the scratch buffer and
    // consumes whole response heads and frames only.
    void on_readable(conn& c) {
        if (!tls_.empty()) return on_readable_tls(c);
        char* buf = scratch_.data();
        while (c.fd >= 0) {
            if (c.st == state::closing) return drain_closing(c);
            if (c.skip > 0) {
                ssize_t n = recv(
                    c.fd, buf, std::min<std::size_t>(c.skip, scratch_size), 0);
                if (n <= 0) return on_read_end(c, n);
                c.skip -= std::uint32_t(n);
                continue;
            }
            ssize_t n = recv(c.fd, buf, scratch_size, MSG_PEEK);
            if (n <= 0) return on_read_end(c, n);
            std::string_view data(buf, std::size_t(n));
            std::size_t used = c.st == state::reading_101 ? on_response(c, data)
                                                          : on_frame(c, data);
            if (used == 0 || c.fd < 0) return;
            // Consume exactly what was handled; the bytes are the same.
            if (recv(c.fd, buf, used, 0) != ssize_t(used)) {
                return lost(c, "recv_short");
            }
        }
    }

    // Reads what TLS connection `c` has: SSL_read until the socket is
    // drained (edge-triggered epoll), whole heads and frames handled from
    // the scratch buffer, an incomplete tail kept in the connection's own
    // buffer until the next read completes it.
    void on_readable_tls(conn& c) {
        if (c.st == state::closing) return drain_closing_tls(c);
        tls_link& t = tls_of(c);
        char* buf = scratch_.data();
        std::size_t have = t.tail_len;
        if (have > 0) {
            std::memcpy(buf, t.tail.get(), have);
            t.tail.reset();
            t.tail_len = 0;
        }
        for (;;) {
            if (have == scratch_size) {
                // Cannot happen: on_response and on_frame fail anything
                // that would not fit, and take whatever is whole.
                return lost(c, "frame_too_big");
            }
            SSL* ssl = t.ssl.get();
            tls_clear();
            int n = SSL_read(ssl, buf + have, int(scratch_size - have));
            if (n <= 0) {
                int e = SSL_get_error(ssl, n);
                if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                    ERR_clear_error();
                    break;
                }
                return lost(c, tls_error(ssl, n));
            }
            have += std::size_t(n);
            std::size_t used = consume(c, std::string_view(buf, have));
            if (c.fd < 0) return;
            have -= used;
            std::memmove(buf, buf + used, have);
        }
        if (have > 0) {
            t.tail = std::make_unique_for_overwrite<char[]>(have);
            std::memcpy(t.tail.get(), buf, have);
            t.tail_len = std::uint32_t(have);
        }
    }

    // Handles the whole response heads and frames at the start of `data`
    // (read from TLS connection `c`), and discards the payload bytes that
    // c.skip still owes; returns how many bytes were used.
    std::size_t consume(conn& c, std::string_view data) {
        std::size_t used = 0;
        while (c.fd >= 0 && used < data.size()) {
            if (c.skip > 0) {
                auto n = std::min<std::size_t>(c.skip, data.size() - used);
                c.skip -= std::uint32_t(n);
                used += n;
                continue;
            }
            auto rest = data.substr(used);
            std::size_t n = c.st == state::reading_101 ? on_response(c, rest)
                                                       : on_frame(c, rest);
            if (n == 0) break;
            used += n;
        }
        return used;
    }

    // Reads and discards until the peer closes a TLS connection in
    // closing; answers its close_notify with ours.
    void drain_closing_tls(conn& c) {
        SSL* ssl = tls_of(c).ssl.get();
        char* buf = scratch_.data();
        for (;;) {
            tls_clear();
            int n = SSL_read(ssl, buf, int(scratch_size));
            if (n > 0) continue;
            int e = SSL_get_error(ssl, n);
            if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
                ERR_clear_error();
                return;
            }
            if (e == SSL_ERROR_ZERO_RETURN) {
                // One non-blocking try; the socket closes right after.
                tls_clear();
                SSL_shutdown(ssl);
            }
            ERR_clear_error();
            ++closed_clean_;
            --closing_;
            return close_fd(c);
        }
    }

    // Handles a recv() that returned 0 (EOF) or -1.
    void on_read_end(conn& c, ssize_t n) {
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
        lost(c, n == 0 ? std::string("eof") : "recv:" + errno_name(errno));
    }

    // Reads and discards until the peer closes a connection in closing.
    void drain_closing(conn& c) {
        char* buf = scratch_.data();
        for (;;) {
            ssize_t n = recv(c.fd, buf, scratch_size, 0);
            if (n > 0) continue;
            if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;
            ++closed_clean_;
            --closing_;
            return close_fd(c);
        }
    }

    // Checks the response head of connection `c`; returns its length, or
    // 0 when it is incomplete or the connection failed.
    std::size_t on_response(conn& c, std::string_view data) {
        auto end = data.find("\r\n\r\n");
        if (end == std::string_view::npos) {
            if (data.size() >= scratch_size) fail(c, "response_too_big");
            return 0;
        }
        std::string_view head = data.substr(0, end + 2);
        auto eol = head.find("\r\n");
        std::string_view status = head.substr(0, eol);
        if (status.size() < 12 || status.substr(0, 9) != "HTTP/1.1 ") {
            fail(c, "bad_response");
            return 0;
        }
        if (status.substr(9, 3) != "101") {
            if (c.lost_ns != 0) retry_after_ms_ = retry_after_ms(head);
            fail(c, "http_" + std::string(status.substr(9, 3)));
            return 0;
        }
        bool upgrade = false, connection = false, accept = false,
             protocol = false;
        std::string want = expected_accept(c);
        head.remove_prefix(eol + 2);
        for_each_header(
            head, [&](std::string_view name, std::string_view value) {
                if (iequals(name, "upgrade")) {
                    upgrade = has_token(value, "websocket");
                } else if (iequals(name, "connection")) {
                    connection = has_token(value, "upgrade");
                } else if (iequals(name, "sec-websocket-accept")) {
                    accept = value == want;
                } else if (iequals(name, "sec-websocket-protocol")) {
                    protocol = value == "pushy.v1";
                }
            });
        if (!upgrade || !connection) {
            fail(c, "bad_upgrade_headers");
            return 0;
        }
        if (!accept) {
            fail(c, "bad_accept");
            return 0;
        }
        bool peer = !opt_.subscribe_path.empty();
        if (!protocol && !peer) {
            fail(c, "bad_subprotocol");
            return 0;
        }
        if (c.lost_ns == 0) {
            lat_101_.push_back(std::uint32_t((now_ns() - c.t0_ns) / 1000));
        }
        c.st = state::reading_hello;
        if (peer) {
            // A peer's subscriber is open at the 101: no hello follows.
            c.st = state::idle;
            ++established_;
            --in_handshake_;
        }
        return end + 4;
    }

    // Returns the Retry-After of a response head in ms (seconds form,
    // RFC 9110 section 10.2.3), or 0 when it has none.
    static double retry_after_ms(std::string_view head) {
        while (!head.empty()) {
            auto eol = head.find("\r\n");
            auto line = head.substr(0, eol);
            auto colon = line.find(':');
            if (colon != std::string_view::npos &&
                iequals(line.substr(0, colon), "retry-after")) {
                auto v = line.substr(colon + 1);
                while (!v.empty() && v.front() == ' ') v.remove_prefix(1);
                unsigned s = 0;
                std::from_chars(v.data(), v.data() + v.size(), s);
                return std::min(s, 3600u) * 1000.0;
            }
            if (eol == std::string_view::npos) break;
            head.remove_prefix(eol + 2);
        }
        return 0;
    }

    // The Sec-WebSocket-Accept value the node must answer for connection
    // `c` (RFC 6455 section 4.2.2, step 5.4).
    std::string expected_accept(const conn& c) const {
        std::string k = base64(c.key, sizeof c.key);
        k += ws_guid;
        auto d = sha1(k);
        return base64(d.data(), d.size());
    }

    // Handles one server frame at the start of `data`; returns the bytes
    // to consume, or 0 when the frame is incomplete or the connection
    // ended. Data frames while idle are consumed header first and their
    // payload skipped, so no frame is ever buffered.
    std::size_t on_frame(conn& c, std::string_view data) {
        if (data.size() < 2) return 0;
        auto b0 = std::uint8_t(data[0]), b1 = std::uint8_t(data[1]);
        bool fin = b0 & 0x80;
        int opcode = b0 & 0x0f;
        if (b1 & 0x80) {
            // RFC 6455 section 5.1: a server never masks.
            protocol_error(c, "masked_server_frame");
            return 0;
        }
        std::uint64_t len = b1 & 0x7f;
        std::size_t head = 2;
        if (len == 126) {
            if (data.size() < 4) return 0;
            len = std::uint64_t(std::uint8_t(data[2])) << 8 |
                  std::uint8_t(data[3]);
            head = 4;
        } else if (len == 127) {
            if (data.size() < 10) return 0;
            len = 0;
            for (int k = 0; k < 8; ++k) {
                len = len << 8 | std::uint8_t(data[2 + k]);
            }
            head = 10;
        }
        bool control = opcode >= 0x8;
        if (control && (len > 125 || !fin)) {
            protocol_error(c, "bad_control_frame");
            return 0;
        }

        if (c.st == state::reading_hello) {
            if (opcode != 0x1 || !fin) {
                fail(c, "bad_hello");
                return 0;
            }
            if (head + len > scratch_size) {
                fail(c, "hello_too_big");
                return 0;
            }
            if (data.size() < head + len) return 0;
            auto payload = data.substr(head, std::size_t(len));
            if (payload.find("\"t\":\"hello\"") == std::string_view::npos) {
                fail(c, "bad_hello");
                return 0;
            }
            std::uint64_t now = now_ns();
            c.st = state::idle;
            --in_handshake_;
            if (c.lost_ns != 0) {
                // A reconnect: its latency counts from the drop.
                ++reconnects_;
                auto us = (now - c.lost_ns) / 1000;
                reconnect_lat_.push_back(
                    std::uint32_t(std::min<std::uint64_t>(us, UINT32_MAX)));
                last_reconnect_ns_ = now;
                c.lost_ns = 0;
                c.attempt = 0;
            } else {
                lat_hello_.push_back(std::uint32_t((now - c.t0_ns) / 1000));
                ++established_;
            }
            return head + std::size_t(len);
        }

        if (!control && opt_.pushes && fin && len <= scratch_size - 16) {
            // A push (or another message that fits the scratch buffer
            // with its head): read it whole.
            if (data.size() < head + len) return 0;
            on_push(c, data.substr(head, std::size_t(len)));
            return c.fd < 0 ? 0 : head + std::size_t(len);
        }
        if (!control && opt_.d2d_rate > 0 && len <= 1024) {
            // A status answer (or a small message): read it whole.
            if (data.size() < head + len) return 0;
            on_status(data.substr(head, std::size_t(len)));
            return head + std::size_t(len);
        }
        if (!control) {
            // A push, reconnect or other message: skip its payload.
            ++frames_ignored_;
            c.skip = std::uint32_t(std::min<std::uint64_t>(len, UINT32_MAX));
            return head;
        }
        if (data.size() < head + len) return 0;
        auto payload = data.substr(head, std::size_t(len));
        if (opcode == 0x9) {
            send_pong(c, payload);
        } else if (opcode == 0x8) {
            int code = payload.size() >= 2 ? (std::uint8_t(payload[0]) << 8) |
                                                 std::uint8_t(payload[1])
                                           : 1005;
            // Normal closure, superseded and token expired are final.
            bool again = code != 1000 && code != 4001 && code != 4002;
            lost(c, "server_close_" + std::to_string(code), again);
            return 0;
        }
        return c.fd < 0 ? 0 : head + std::size_t(len);
    }

    // Answers a ping with a masked pong carrying the same payload (RFC
    // 6455 sections 5.3 and 5.5.3).
    void send_pong(conn& c, std::string_view payload) {
        std::uint8_t frame[2 + 4 + 125];
        frame[0] = 0x8A;
        frame[1] = std::uint8_t(0x80 | payload.size());
        std::uint32_t mask = masks_.next();
        std::memcpy(frame + 2, &mask, 4);
        for (std::size_t k = 0; k < payload.size(); ++k) {
            frame[6 + k] = std::uint8_t(payload[k]) ^ frame[2 + k % 4];
        }
        std::size_t n = 6 + payload.size();
        std::string why;
        if (!send_whole(c, frame, n, &why)) {
            return lost(c, "pong_send:" + why);
        }
        ++pongs_sent_;
    }

    // Ends a connection after a protocol violation by the server.
    void protocol_error(conn& c, const std::string& why) {
        if (c.st == state::idle) return lost(c, why);
        fail(c, why);
    }

    // Ends a connection that stopped: a failure during the handshake, a
    // drop once it was established. With --reconnect a drop that `may_retry`
    // puts the connection in backoff.
    void lost(conn& c, const std::string& why, bool may_retry = true) {
        if (c.st == state::idle) {
            ++dropped_[why];
            ++dropped_total_;
            close_fd(c);
            if (opt_.reconnect && may_retry && !closing_all_) {
                std::uint64_t now = now_ns();
                if (first_loss_ns_ == 0) first_loss_ns_ = now;
                c.lost_ns = now;
                c.attempt = 0;
                schedule_reconnect(c, now, 0);
            }
            return;
        }
        if (c.st == state::closing) {
            ++closed_clean_;
            --closing_;
            return close_fd(c);
        }
        fail(c, why);
    }

    // Counts a failed handshake by reason and closes its socket. A failed
    // reconnect attempt is counted apart and tried again, unless the node
    // refused the device itself (a 4xx) or the generator is closing.
    void fail(conn& c, const std::string& why) {
        --in_handshake_;
        close_fd(c);
        if (c.lost_ns == 0) {
            ++failed_[why];
            ++failed_total_;
            return;
        }
        ++reconnect_failed_[why];
        double at_least = std::exchange(retry_after_ms_, 0.0);
        if (closing_all_) return;
        if (why.rfind("http_4", 0) == 0) {
            ++reconnect_gave_up_;
            return;
        }
        schedule_reconnect(c, now_ns(), at_least);
    }

    // Closes the socket of `c` (which leaves the epoll set with it) and
    // frees its TLS side.
    void close_fd(conn& c) {
        if (!tls_.empty()) {
            tls_link& t = tls_of(c);
            t.ssl.reset();
            t.tail.reset();
            t.tail_len = 0;
        }
        if (c.fd >= 0) ::close(c.fd);
        c.fd = -1;
        c.st = state::done;
    }

    // Fails connections whose handshake outlived --handshake-timeout-s.
    void expire_handshakes(std::uint64_t now) {
        auto limit = std::uint64_t(opt_.handshake_timeout_s * 1e9);
        for (auto& c : conns_) {
            if (c.fd < 0 || c.st == state::idle || c.st == state::pending ||
                c.st == state::closing || c.st == state::done) {
                continue;
            }
            if (now < c.t0_ns + limit) continue;
            switch (c.st) {
                case state::connecting:
                    fail(c, "timeout_connect");
                    break;
                case state::tls_handshake:
                    fail(c, "timeout_tls");
                    break;
                case state::sending:
                    fail(c, "timeout_send");
                    break;
                case state::reading_101:
                    fail(c, "timeout_101");
                    break;
                default:
                    fail(c, "timeout_hello");
                    break;
            }
        }
    }

    // Appends `"name":{"reason":count,...}` to `out`.
    static void append_reasons(std::string& out, const char* name,
                               const std::map<std::string, std::size_t>& m) {
        out += "\"";
        out += name;
        out += "\":{";
        bool first = true;
        for (auto& [why, n] : m) {
            if (!first) out += ",";
            first = false;
            out += "\"" + why + "\":" + std::to_string(n);
        }
        out += "}";
    }

    // Appends the reconnect figures: counts, the latency from each drop to
    // its new hello (percentiles, and 100 quantiles for a CDF), and the
    // CLOCK_MONOTONIC times of the first drop and the last reconnect.
    void append_reconnects(std::string& s) {
        std::sort(reconnect_lat_.begin(), reconnect_lat_.end());
        const auto& v = reconnect_lat_;
        s += ",\"reconnect\":{\"reconnects\":" + std::to_string(reconnects_);
        s += ",\"attempts\":" + std::to_string(reconnect_attempts_);
        std::size_t failed = 0;
        for (auto& [why, n] : reconnect_failed_) failed += n;
        s += ",\"failed_attempts\":" + std::to_string(failed);
        s += ",";
        append_reasons(s, "failed_by_reason", reconnect_failed_);
        s += ",\"gave_up\":" + std::to_string(reconnect_gave_up_);
        s += ",\"waiting_at_end\":" + std::to_string(reconnect_waiting_at_end_);
        s += ",\"first_loss_ns\":" + std::to_string(first_loss_ns_);
        s += ",\"last_reconnect_ns\":" + std::to_string(last_reconnect_ns_);
        double span = last_reconnect_ns_ > first_loss_ns_ && first_loss_ns_
                          ? double(last_reconnect_ns_ - first_loss_ns_) / 1e9
                          : 0;
        char b[64];
        std::snprintf(b, sizeof b, "%.3f", span);
        s += ",\"span_s\":";
        s += b;
        s += ",\"latency_us\":{\"count\":" + std::to_string(v.size());
        for (auto [name, q] : {std::pair{"p50", 0.5}, {"p90", 0.9},
                               {"p99", 0.99}, {"p99.9", 0.999}}) {
            s += ",\"";
            s += name;
            s += "\":" + std::to_string(percentile(v, q));
        }
        s += ",\"max\":" + std::to_string(v.empty() ? 0 : v.back());
        s += ",\"quantiles\":[";
        for (int k = 1; k <= 100 && !v.empty(); ++k) {
            if (k > 1) s += ",";
            s += std::to_string(percentile(v, k / 100.0));
        }
        s += "]}}";
    }

    // Prints the run's figures: one JSON object with --json, else text.
    void report() {
        std::sort(lat_101_.begin(), lat_101_.end());
        std::sort(lat_hello_.begin(), lat_hello_.end());
        std::sort(lat_tls_.begin(), lat_tls_.end());
        double connect_s = double(t_connected_ - t_begin_) / 1e9;
        double hold_s = double(t_hold_end_ - t_connected_) / 1e9;
        double rate = connect_s > 0 ? double(established_) / connect_s : 0;
        auto num = [](double v) {
            char b[64];
            std::snprintf(b, sizeof b, "%.3f", v);
            return std::string(b);
        };
        auto lat = [&](const std::vector<std::uint32_t>& v) {
            return "{\"p50\":" + std::to_string(percentile(v, 0.50)) +
                   ",\"p99\":" + std::to_string(percentile(v, 0.99)) +
                   ",\"max\":" + std::to_string(v.empty() ? 0 : v.back()) + "}";
        };
        std::string s = "{";
        s += "\"requested\":" + std::to_string(conns_.size());
        s += ",\"started\":" + std::to_string(started_);
        s += ",\"connected\":" + std::to_string(established_);
        s += ",\"failed\":" + std::to_string(failed_total_) + ",";
        append_reasons(s, "failed_by_reason", failed_);
        s += ",\"dropped\":" + std::to_string(dropped_total_) + ",";
        append_reasons(s, "dropped_by_reason", dropped_);
        s += ",\"open_at_end\":" + std::to_string(open_at_end_);
        s += ",\"closed_clean\":" + std::to_string(closed_clean_);
        s += ",\"closed_forced\":" + std::to_string(closed_forced_);
        s += ",\"pongs_sent\":" + std::to_string(pongs_sent_);
        s += ",\"frames_ignored\":" + std::to_string(frames_ignored_);
        s += ",\"rate_target_per_s\":" + num(opt_.rate);
        s += ",\"connect_phase_s\":" + num(connect_s);
        s += ",\"upgrade_rate_per_s\":" + num(rate);
        s += opt_.tls ? ",\"tls\":true" : ",\"tls\":false";
        if (opt_.tls) s += ",\"tls_latency_us\":" + lat(lat_tls_);
        s += ",\"handshake_latency_us\":" + lat(lat_101_);
        s += ",\"hello_latency_us\":" + lat(lat_hello_);
        s += ",\"hold_s\":" + num(hold_s);
        if (opt_.pushes) {
            std::sort(push_lat_.begin(), push_lat_.end());
            s += ",\"pushes\":{\"received\":" +
                 std::to_string(pushes_received_);
            s += ",\"acked\":" + std::to_string(pushes_acked_);
            s += ",\"distinct\":" + std::to_string(pushes_distinct_);
            s += ",\"duplicates\":" + std::to_string(pushes_duplicate_);
            s += ",\"latency_us\":{\"count\":" +
                 std::to_string(push_lat_.size());
            s += ",\"p50\":" + std::to_string(percentile(push_lat_, 0.50));
            s += ",\"p99\":" + std::to_string(percentile(push_lat_, 0.99));
            s += ",\"p99.9\":" + std::to_string(percentile(push_lat_, 0.999));
            s += ",\"max\":" +
                 std::to_string(push_lat_.empty() ? 0 : push_lat_.back());
            s += "}}";
        }
        if (opt_.reconnect) append_reconnects(s);
        if (opt_.d2d_rate > 0) {
            std::sort(d2d_lat_.begin(), d2d_lat_.end());
            double d2d_s = double(t_d2d_end_ - t_d2d_begin_) / 1e9;
            s += ",\"d2d\":{\"rate_target_per_s\":" + num(opt_.d2d_rate);
            s += ",\"send_s\":" + num(d2d_s);
            s += ",\"sent\":" + std::to_string(d2d_sent_);
            s += ",\"dropped\":" + std::to_string(d2d_dropped_);
            s += ",\"answered\":" + std::to_string(d2d_answered_);
            s += ",\"codes\":{";
            bool first = true;
            for (auto& [code, n] : d2d_codes_) {
                if (!first) s += ",";
                first = false;
                s += "\"" + std::to_string(code) + "\":" + std::to_string(n);
            }
            s += "},\"latency_us\":{\"count\":" + std::to_string(d2d_lat_.size());
            s += ",\"p50\":" + std::to_string(percentile(d2d_lat_, 0.50));
            s += ",\"p99\":" + std::to_string(percentile(d2d_lat_, 0.99));
            s += ",\"p99.9\":" + std::to_string(percentile(d2d_lat_, 0.999));
            s += ",\"max\":" +
                 std::to_string(d2d_lat_.empty() ? 0 : d2d_lat_.back());
            s += "}}";
        }
        s += "}";
        if (opt_.json) {
            std::printf("%s\n", s.c_str());
            return;
        }
        std::printf(
            "connected %zu of %zu, failed %zu, dropped %zu\n"
            "upgrade rate %.0f/s over %.3f s (target %.0f/s)\n"
            "handshake (to 101) p50 %u us, p99 %u us\n"
            "to hello p50 %u us, p99 %u us\n"
            "held %.1f s, %zu pongs sent\n",
            established_, conns_.size(), failed_total_, dropped_total_, rate,
            connect_s, opt_.rate, percentile(lat_101_, 0.5),
            percentile(lat_101_, 0.99), percentile(lat_hello_, 0.5),
            percentile(lat_hello_, 0.99), hold_s, pongs_sent_);
        if (opt_.tls) {
            std::printf("tls handshake p50 %u us, p99 %u us\n",
                        percentile(lat_tls_, 0.5), percentile(lat_tls_, 0.99));
        }
        for (auto& [why, n] : failed_) {
            std::printf("failed: %s %zu\n", why.c_str(), n);
        }
        for (auto& [why, n] : dropped_) {
            std::printf("dropped: %s %zu\n", why.c_str(), n);
        }
    }

    options opt_;
    token_file tokens_;
    std::vector<conn> conns_;
    std::vector<sockaddr_in> srcs_;
    sockaddr_in dst_{};
    std::string host_header_;
    std::vector<char> scratch_;
    mask_source masks_;
    int ep_ = -1;
    int sig_ = -1;
    bool stop_ = false;
    struct ctx_free {
        void operator()(SSL_CTX* ctx) const { SSL_CTX_free(ctx); }
    };
    std::unique_ptr<SSL_CTX, ctx_free> ctx_;  // under --tls only
    std::vector<tls_link> tls_;  // one per connection under --tls, else empty

    std::size_t started_ = 0;
    std::size_t in_handshake_ = 0;
    std::size_t established_ = 0;
    std::size_t failed_total_ = 0;
    std::size_t dropped_total_ = 0;
    std::size_t open_at_end_ = 0;
    std::size_t closing_ = 0;
    std::size_t closed_clean_ = 0;
    std::size_t closed_forced_ = 0;
    std::size_t pongs_sent_ = 0;
    std::size_t frames_ignored_ = 0;
    std::map<std::string, std::size_t> failed_;
    std::map<std::string, std::size_t> dropped_;
    std::vector<std::uint32_t> lat_101_;
    std::vector<std::uint32_t> lat_hello_;
    std::vector<std::uint32_t> lat_tls_;  // connect() to TLS handshake done
    std::uint64_t t_begin_ = 0;
    std::uint64_t t_connected_ = 0;
    std::uint64_t t_hold_end_ = 0;
    std::uint64_t t_d2d_begin_ = 0;
    std::uint64_t t_d2d_end_ = 0;
    std::uint64_t d2d_sent_ = 0;
    std::uint64_t d2d_dropped_ = 0;
    std::uint64_t d2d_answered_ = 0;
    std::map<int, std::size_t> d2d_codes_;
    std::vector<std::uint32_t> d2d_lat_;
    std::vector<std::uint32_t> push_lat_;
    std::size_t pushes_received_ = 0;
    std::size_t pushes_acked_ = 0;
    std::size_t pushes_distinct_ = 0;
    std::size_t pushes_duplicate_ = 0;
    std::vector<std::uint64_t> seen_;  // a bit per push "seq" received
    // Due reconnect attempts: (CLOCK_MONOTONIC ns, connection), soonest
    // first; one entry per connection in backoff.
    std::priority_queue<std::pair<std::uint64_t, std::uint32_t>,
                        std::vector<std::pair<std::uint64_t, std::uint32_t>>,
                        std::greater<>>
        retry_;
    bool closing_all_ = false;
    double retry_after_ms_ = 0;  // of the refusal being failed
    std::size_t reconnects_ = 0;
    std::size_t reconnect_attempts_ = 0;
    std::size_t reconnect_gave_up_ = 0;
    std::size_t reconnect_waiting_at_end_ = 0;
    std::map<std::string, std::size_t> reconnect_failed_;
    std::vector<std::uint32_t> reconnect_lat_;
    std::uint64_t first_loss_ns_ = 0;
    std::uint64_t last_reconnect_ns_ = 0;
    std::size_t pushes_said_ = 0;
    std::uint64_t last_push_ns_ = 0;
    std::uint64_t t_pushes_said_ = 0;
    std::string ack_payload_;
    std::string ack_frame_;
    std::string d2d_payload_;  // scratch of send_d2d
};

// ------------------------------------------------------------ publisher

// One keep-alive HTTP/1.1 connection of the publisher, with the requests
// it has not written yet and the answer bytes it has not parsed yet.
struct pub_conn {
    int fd = -1;
    std::string out;
    std::size_t out_sent = 0;
    std::string in;
    std::size_t in_flight = 0;  // requests queued or written, not answered
};

// Publishes --publish messages with one HTTP POST each (--publish mode).
class http_publisher {
  public:
    // Connects the --publish-conns connections; exits 1 on failure.
    explicit http_publisher(const options& o)
        : opt_(o), conns_(o.publish_conns) {
        sockaddr_in dst{};
        if (!is_loopback(opt_.host, dst.sin_addr)) {
            std::fprintf(stderr,
                         "pushy-loadgen: --host must be an IPv4 "
                         "address in 127.0.0.0/8\n");
            std::exit(2);
        }
        dst.sin_family = AF_INET;
        dst.sin_port = htons(std::uint16_t(opt_.port));
        host_header_ = opt_.host + ":" + std::to_string(opt_.port);
        ep_ = epoll_create1(EPOLL_CLOEXEC);
        for (std::size_t i = 0; i < conns_.size(); ++i) {
            int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (fd < 0 || connect(fd, reinterpret_cast<const sockaddr*>(&dst),
                                  sizeof dst) != 0) {
                std::fprintf(stderr,
                             "pushy-loadgen: cannot connect to %s: %s\n",
                             host_header_.c_str(), std::strerror(errno));
                std::exit(1);
            }
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
            epoll_event ev{};
            ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
            ev.data.u64 = i;
            epoll_ctl(ep_, EPOLL_CTL_ADD, fd, &ev);
            conns_[i].fd = fd;
        }
        scratch_.resize(scratch_size);
    }

    // Sends every message and waits for its answer (or 10 s without any
    // answer); prints the report and returns the exit code (0 when every
    // message was answered 2xx).
    int run() {
        t_begin_ = now_ns();
        std::uint64_t last_answer = t_begin_;
        double gap_ns = opt_.publish_rate > 0 ? 1e9 / opt_.publish_rate : 0;
        std::size_t next_conn = 0;
        while (answered_ + failed_ < opt_.publish) {
            std::uint64_t now = now_ns();
            // Queue what is due on connections with room in their window,
            // round robin, then write it.
            std::size_t tries = 0;
            while (sent_ < opt_.publish && tries < conns_.size()) {
                std::uint64_t due =
                    t_begin_ + std::uint64_t(double(sent_) * gap_ns);
                if (due > now) break;
                pub_conn& c = conns_[next_conn];
                next_conn = (next_conn + 1) % conns_.size();
                if (c.fd < 0 || c.in_flight >= opt_.pipeline) {
                    ++tries;
                    continue;
                }
                tries = 0;
                queue_request(c, gap_ns > 0 ? due : now);
            }
            for (auto& c : conns_) flush(c);
            if (dead_all()) break;
            int timeout = 100;
            if (sent_ < opt_.publish && gap_ns > 0) {
                std::uint64_t due =
                    t_begin_ + std::uint64_t(double(sent_) * gap_ns);
                timeout = due <= now ? 0 : int((due - now) / 1'000'000);
                timeout = std::min(timeout, 100);
            }
            std::size_t before = answered_ + failed_;
            poll(timeout);
            now = now_ns();
            if (answered_ + failed_ != before) last_answer = now;
            if (now > last_answer + 10'000'000'000u) break;  // stalled
        }
        t_end_ = now_ns();
        report();
        std::size_t ok = 0;
        for (auto& [code, n] : codes_) {
            if (code >= 200 && code < 300) ok += n;
        }
        return ok == opt_.publish ? 0 : 1;
    }

  private:
    // True when every connection has failed.
    bool dead_all() const {
        return std::all_of(conns_.begin(), conns_.end(),
                           [](const pub_conn& c) { return c.fd < 0; });
    }

    // Appends one POST of message `sent_` to a random target to `c`.
    void queue_request(pub_conn& c, std::uint64_t ts) {
        body_ = "{\"ts\":" + std::to_string(ts) +
                ",\"seq\":" + std::to_string(sent_) + "}";
        std::size_t target = std::size_t(rng_.next()) % opt_.publish_targets;
        c.out += "POST ";
        c.out += opt_.publish_path;
        c.out += std::to_string(target);
        c.out += " HTTP/1.1\r\nHost: ";
        c.out += host_header_;
        c.out += "\r\nContent-Length: ";
        c.out += std::to_string(body_.size());
        c.out += "\r\n\r\n";
        c.out += body_;
        ++c.in_flight;
        ++sent_;
    }

    // Writes what `c` has queued, as far as the socket takes it.
    void flush(pub_conn& c) {
        while (c.fd >= 0 && c.out_sent < c.out.size()) {
            ssize_t n = send(c.fd, c.out.data() + c.out_sent,
                             c.out.size() - c.out_sent, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) return;
                return lose(c, "send:" + errno_name(errno));
            }
            c.out_sent += std::size_t(n);
        }
        c.out.clear();
        c.out_sent = 0;
    }

    // Waits up to `timeout_ms` for answers and parses them.
    void poll(int timeout_ms) {
        epoll_event events[64];
        int n = epoll_wait(ep_, events, 64, timeout_ms);
        for (int k = 0; k < n; ++k) {
            pub_conn& c = conns_[events[k].data.u64];
            if (c.fd < 0) continue;
            if (events[k].events & EPOLLOUT) flush(c);
            read_answers(c);
        }
    }

    // Reads what `c` has and counts each whole answer by status code.
    void read_answers(pub_conn& c) {
        char* buf = scratch_.data();
        while (c.fd >= 0) {
            ssize_t n = recv(c.fd, buf, scratch_size, 0);
            if (n == 0) return lose(c, "eof");
            if (n < 0) {
                if (errno == EAGAIN || errno == EINTR) break;
                return lose(c, "recv:" + errno_name(errno));
            }
            c.in.append(buf, std::size_t(n));
        }
        std::size_t used = 0;
        while (c.fd >= 0) {
            std::string_view rest(c.in.data() + used, c.in.size() - used);
            std::size_t len = parse_answer(c, rest);
            if (len == 0) break;
            used += len;
        }
        c.in.erase(0, used);
    }

    // Parses one answer at the start of `data`; returns its length, or 0
    // when it is incomplete or the connection failed. Answers need a
    // Content-Length (Nchan's have one).
    std::size_t parse_answer(pub_conn& c, std::string_view data) {
        auto end = data.find("\r\n\r\n");
        if (end == std::string_view::npos) return 0;
        if (data.size() < 12 || data.substr(0, 9) != "HTTP/1.1 ") {
            lose(c, "bad_response");
            return 0;
        }
        int code = 0;
        std::from_chars(data.data() + 9, data.data() + 12, code);
        std::size_t length = 0;
        bool close = false, sized = false;
        std::string_view head = data.substr(0, end + 2);
        head.remove_prefix(head.find("\r\n") + 2);
        for_each_header(
            head, [&](std::string_view name, std::string_view value) {
                if (iequals(name, "content-length")) {
                    std::from_chars(value.data(), value.data() + value.size(),
                                    length);
                    sized = true;
                } else if (iequals(name, "connection")) {
                    close = has_token(value, "close");
                }
            });
        if (!sized) {
            lose(c, "unsized_response");
            return 0;
        }
        std::size_t total = end + 4 + length;
        if (data.size() < total) return 0;
        ++codes_[code];
        ++answered_;
        --c.in_flight;
        if (close) lose(c, "server_close");
        return c.fd < 0 ? 0 : total;
    }

    // Closes `c` after an error; its unanswered requests count as failed.
    void lose(pub_conn& c, const std::string& why) {
        failed_ += c.in_flight;
        if (c.in_flight > 0) failed_by_[why] += c.in_flight;
        c.in_flight = 0;
        ::close(c.fd);
        c.fd = -1;
        c.out.clear();
        c.in.clear();
    }

    // Prints the publisher's figures: one JSON object with --json, else text.
    void report() {
        double secs = double(t_end_ - t_begin_) / 1e9;
        char num[64];
        std::snprintf(num, sizeof num, "%.3f", secs);
        std::string s =
            "{\"publish\":{\"messages\":" + std::to_string(opt_.publish);
        s += ",\"sent\":" + std::to_string(sent_);
        s += ",\"answered\":" + std::to_string(answered_);
        s += ",\"failed\":" + std::to_string(opt_.publish - answered_);
        s += ",\"seconds\":";
        s += num;
        s += ",\"connections\":" + std::to_string(conns_.size());
        s += ",\"pipeline\":" + std::to_string(opt_.pipeline);
        s += ",\"codes\":{";
        bool first = true;
        for (auto& [code, n] : codes_) {
            if (!first) s += ",";
            first = false;
            s += "\"" + std::to_string(code) + "\":" + std::to_string(n);
        }
        s += "},\"failed_by_reason\":{";
        first = true;
        for (auto& [why, n] : failed_by_) {
            if (!first) s += ",";
            first = false;
            s += "\"" + why + "\":" + std::to_string(n);
        }
        s += "}}}";
        if (opt_.json) {
            std::printf("%s\n", s.c_str());
            return;
        }
        std::printf("published %zu of %zu in %.3f s (%.0f/s), %zu failed\n",
                    answered_, opt_.publish, secs,
                    secs > 0 ? double(answered_) / secs : 0.0,
                    opt_.publish - answered_);
        for (auto& [code, n] : codes_) std::printf("code %d: %zu\n", code, n);
    }

    options opt_;
    std::vector<pub_conn> conns_;
    std::string host_header_;
    std::vector<char> scratch_;
    std::string body_;  // scratch of queue_request
    mask_source rng_;
    int ep_ = -1;
    std::size_t sent_ = 0;
    std::size_t answered_ = 0;
    std::size_t failed_ = 0;
    std::map<int, std::size_t> codes_;
    std::map<std::string, std::size_t> failed_by_;
    std::uint64_t t_begin_ = 0;
    std::uint64_t t_end_ = 0;
};

}  // namespace

// Parses the options, runs the generator and returns its exit code.
int main(int argc, char** argv) {
    options o = parse_options(argc, argv);
    // End with the benchmark that started it, even if that one is killed:
    // SIGTERM closes the connections and reports, as at the end of a hold.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (o.publish > 0) {
        http_publisher pub(o);
        return pub.run();
    }
    load_generator gen(o);
    return gen.run();
}
