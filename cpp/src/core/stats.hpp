// Node counters: connections, pushes by outcome, bytes, rejects by reason.
//
// Each io thread owns one `counters` block and is its only writer (relaxed
// atomics, no sharing of cache lines between threads on the hot path);
// readers sum every block when stats are asked for.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace pushy {

// What happened to a push; each has its HTTP-like status code.
enum class push_outcome : std::uint8_t {
    delivered,      // 200
    not_connected,  // 404
    bad_request,    // 400
    too_large,      // 413
    disconnected,   // 503: the connection closed before the frame went out
                    //      or before the device acked
    unavailable,    // 503
    timeout,        // 504
    count_
};

// Status code and JSON status name of an outcome.
int status_code(push_outcome o) noexcept;
std::string_view status_name(push_outcome o) noexcept;

// Why a connection, upgrade or message was refused. Each name is a metric
// label and appears under "rejects" in /v1/stats.
enum class reject : std::uint8_t {
    bad_request,          // malformed HTTP upgrade request
    bad_method,
    bad_path,
    bad_http_version,
    not_upgrade,
    bad_ws_version,
    bad_ws_key,
    bad_subprotocol,
    bad_origin,
    headers_too_large,
    too_many_headers,
    upgrade_timeout,
    tls_handshake_failed,   // bad TLS (plain HTTP on the TLS port, ...)
    tls_handshake_timeout,
    out_of_files,           // closed unanswered: no file descriptor left
    too_many_connections,
    accept_rate,          // 503: over the accept rate
    draining,             // 503: the node is draining
    shutting_down,        // 503: the node is stopping
    token_missing,
    token_malformed,
    token_bad_signature,
    token_wrong_algorithm,
    token_expired,
    token_no_expiry,
    token_no_device,
    token_bad_audience,
    token_bad_meta,
    protocol_error,       // close 1002
    invalid_utf8,         // close 1007
    message_too_big,      // close 1009
    bad_message,          // status 400 to a device message
    pong_timeout,
    token_expired_live,   // close 4002
    superseded,           // close 4001
    slow_consumer,        // close 4003
    bad_push,             // HTTP 400 on the push API
    count_
};

std::string_view reject_name(reject r) noexcept;

// Status codes a device-to-device message can be answered with, in the
// order of counters::d2d_status.
inline constexpr int d2d_codes[] = {200, 400, 403, 404, 413, 429, 503, 504};
inline constexpr std::size_t d2d_code_count = std::size(d2d_codes);

// Status codes an upstream message (send, subscribe, unsubscribe) can be
// answered with, in the order of counters::upstream_status.
inline constexpr int upstream_codes[] = {202, 400, 403, 413, 429, 503};
inline constexpr std::size_t upstream_code_count = std::size(upstream_codes);

// A latency histogram with four buckets per power of two of microseconds
// (at most 19% wide), from 1 us to about 17 s. Single writer.
struct latency_histogram {
    static constexpr std::size_t bucket_count = 97;
    std::array<std::atomic<std::uint64_t>, bucket_count> buckets{};

    static std::size_t bucket_of(double us) noexcept;
    // The upper edge of bucket `i`, in microseconds.
    static double upper_us(std::size_t i) noexcept;
    void record(double us) noexcept;
};

struct alignas(64) counters {
    std::atomic<std::uint64_t> connections_opened{0};
    std::atomic<std::uint64_t> connections_closed{0};
    std::atomic<std::uint64_t> bytes_in{0};
    std::atomic<std::uint64_t> bytes_out{0};
    std::atomic<std::uint64_t> messages_in{0};
    std::atomic<std::uint64_t> messages_out{0};
    std::atomic<std::uint64_t> pings_sent{0};
    // TLS handshakes completed on the device port.
    std::atomic<std::uint64_t> tls_handshakes{0};
    // Reconnect messages sent (lifetime, drain), and connections closed
    // because they were still open a grace period after theirs.
    std::atomic<std::uint64_t> reconnects_lifetime{0};
    std::atomic<std::uint64_t> reconnects_drain{0};
    std::atomic<std::uint64_t> reconnect_closes{0};
    std::array<std::atomic<std::uint64_t>,
               static_cast<std::size_t>(push_outcome::count_)>
        pushes{};
    std::array<std::atomic<std::uint64_t>,
               static_cast<std::size_t>(reject::count_)>
        rejects{};

    // Device-to-device: messages received from devices connected here,
    // forwarded to other nodes, delivered to devices connected here, the
    // answers sent by code, and arrival-to-answer latency.
    std::atomic<std::uint64_t> d2d_received{0};
    std::atomic<std::uint64_t> d2d_forwarded{0};
    std::atomic<std::uint64_t> d2d_delivered{0};
    std::array<std::atomic<std::uint64_t>, d2d_code_count> d2d_status{};
    latency_histogram d2d_latency;

    // Upstream: send messages and subscribe/unsubscribe messages received
    // from devices connected here, and the answers sent by code.
    std::atomic<std::uint64_t> sends_received{0};
    std::atomic<std::uint64_t> subscriptions_received{0};
    std::array<std::atomic<std::uint64_t>, upstream_code_count>
        upstream_status{};

    // Single-writer increment: a relaxed load and store, no locked add.
    static void bump(std::atomic<std::uint64_t>& c,
                     std::uint64_t n = 1) noexcept {
        c.store(c.load(std::memory_order_relaxed) + n,
                std::memory_order_relaxed);
    }
    void count(push_outcome o) noexcept {
        bump(pushes[static_cast<std::size_t>(o)]);
    }
    void count(reject r) noexcept {
        bump(rejects[static_cast<std::size_t>(r)]);
    }
    void count_d2d_status(int code) noexcept {
        for (std::size_t i = 0; i < d2d_code_count; ++i) {
            if (d2d_codes[i] == code) return bump(d2d_status[i]);
        }
    }
    void count_upstream_status(int code) noexcept {
        for (std::size_t i = 0; i < upstream_code_count; ++i) {
            if (upstream_codes[i] == code) return bump(upstream_status[i]);
        }
    }
};

// Renders the stats JSON served at GET /v1/stats from every thread's
// counters. `connections` is the live count from the connection table.
std::string stats_json(std::string_view node_id, std::size_t connections,
                       const std::vector<const counters*>& blocks,
                       double uptime_s);

}  // namespace pushy
