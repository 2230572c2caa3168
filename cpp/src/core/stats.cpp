#include "core/stats.hpp"

#include <cmath>

#include "detail/json_out.hpp"

namespace pushy {

namespace {

constexpr std::string_view outcome_names[] = {
    "delivered", "not_connected", "bad_request", "too_large",
    "disconnected", "unavailable", "timeout",
};
constexpr int outcome_codes[] = {200, 404, 400, 413, 503, 503, 504};
static_assert(std::size(outcome_names) ==
              static_cast<std::size_t>(push_outcome::count_));

constexpr std::string_view reject_names[] = {
    "bad_request",        "bad_method",
    "bad_path",           "bad_http_version",
    "not_upgrade",        "bad_ws_version",
    "bad_ws_key",         "bad_subprotocol",
    "bad_origin",         "headers_too_large",
    "too_many_headers",   "upgrade_timeout",
    "tls_handshake_failed", "tls_handshake_timeout",
    "out_of_files",
    "too_many_connections", "accept_rate",
    "draining",           "shutting_down",
    "token_missing",
    "token_malformed",    "token_bad_signature",
    "token_wrong_algorithm", "token_expired",
    "token_no_expiry",
    "token_no_device",    "token_bad_audience",
    "token_bad_meta",
    "protocol_error",     "invalid_utf8",
    "message_too_big",    "bad_message",
    "pong_timeout",       "token_expired_live",
    "superseded",         "slow_consumer",
    "bad_push",
};
static_assert(std::size(reject_names) ==
              static_cast<std::size_t>(reject::count_));

}  // namespace

int status_code(push_outcome o) noexcept {
    return outcome_codes[static_cast<std::size_t>(o)];
}

std::string_view status_name(push_outcome o) noexcept {
    return outcome_names[static_cast<std::size_t>(o)];
}

std::string_view reject_name(reject r) noexcept {
    return reject_names[static_cast<std::size_t>(r)];
}

std::size_t latency_histogram::bucket_of(double us) noexcept {
    if (!(us > 1)) return 0;
    auto i = static_cast<std::size_t>(std::floor(4 * std::log2(us))) + 1;
    return std::min(i, bucket_count - 1);
}

double latency_histogram::upper_us(std::size_t i) noexcept {
    return std::exp2(static_cast<double>(i) / 4);
}

void latency_histogram::record(double us) noexcept {
    counters::bump(buckets[bucket_of(us)]);
}

// Sums a counter over all blocks.
template <class F>
static std::uint64_t sum(const std::vector<const counters*>& blocks, F f) {
    std::uint64_t n = 0;
    for (auto* b : blocks) n += f(*b).load(std::memory_order_relaxed);
    return n;
}

// Appends {"<code>":count,...} for `codes`, each count summed over the
// blocks from the array `counts(block)` (in the order of `codes`).
template <std::size_t N, class F>
static void append_by_code(std::string& s, const int (&codes)[N],
                           const std::vector<const counters*>& blocks,
                           F counts) {
    s += '{';
    for (std::size_t i = 0; i < N; ++i) {
        if (i) s += ',';
        s += '"' + std::to_string(codes[i]) + "\":";
        s += std::to_string(
            sum(blocks, [&](auto& b) -> auto& { return counts(b)[i]; }));
    }
    s += '}';
}

// Builds the /v1/stats document. Every push outcome and reject reason is
// present, zero or not, so dashboards see a stable shape.
std::string stats_json(std::string_view node_id, std::size_t connections,
                       const std::vector<const counters*>& blocks,
                       double uptime_s) {
    std::string s;
    s.reserve(1024);
    s += "{\"node\":";
    json::append_string(s, node_id);
    s += ",\"uptime_s\":";
    json::append_number(s, uptime_s);
    s += ",\"connections\":" + std::to_string(connections);
    auto field = [&](std::string_view name, std::uint64_t v) {
        s += ",\"";
        s += name;
        s += "\":";
        s += std::to_string(v);
    };
    field("connections_opened",
          sum(blocks, [](auto& b) -> auto& { return b.connections_opened; }));
    field("connections_closed",
          sum(blocks, [](auto& b) -> auto& { return b.connections_closed; }));
    field("bytes_in", sum(blocks, [](auto& b) -> auto& { return b.bytes_in; }));
    field("bytes_out",
          sum(blocks, [](auto& b) -> auto& { return b.bytes_out; }));
    field("messages_in",
          sum(blocks, [](auto& b) -> auto& { return b.messages_in; }));
    field("messages_out",
          sum(blocks, [](auto& b) -> auto& { return b.messages_out; }));
    field("pings_sent",
          sum(blocks, [](auto& b) -> auto& { return b.pings_sent; }));
    field("tls_handshakes",
          sum(blocks, [](auto& b) -> auto& { return b.tls_handshakes; }));
    s += ",\"reconnects\":{\"lifetime\":";
    s += std::to_string(
        sum(blocks, [](auto& b) -> auto& { return b.reconnects_lifetime; }));
    s += ",\"drain\":";
    s += std::to_string(
        sum(blocks, [](auto& b) -> auto& { return b.reconnects_drain; }));
    s += '}';
    field("reconnect_grace_closes",
          sum(blocks, [](auto& b) -> auto& { return b.reconnect_closes; }));
    s += ",\"pushes\":{";
    for (std::size_t i = 0; i < std::size(outcome_names); ++i) {
        if (i) s += ',';
        s += '"';
        s += outcome_names[i];
        s += "\":";
        s += std::to_string(
            sum(blocks, [i](auto& b) -> auto& { return b.pushes[i]; }));
    }
    s += "},\"rejects\":{";
    for (std::size_t i = 0; i < std::size(reject_names); ++i) {
        if (i) s += ',';
        s += '"';
        s += reject_names[i];
        s += "\":";
        s += std::to_string(
            sum(blocks, [i](auto& b) -> auto& { return b.rejects[i]; }));
    }
    s += "},\"upstream\":{";
    s += "\"sends\":" + std::to_string(sum(blocks, [](auto& b) -> auto& {
             return b.sends_received;
         }));
    s += ",\"subscriptions\":" +
         std::to_string(sum(blocks, [](auto& b) -> auto& {
             return b.subscriptions_received;
         }));
    s += ",\"status\":";
    append_by_code(s, upstream_codes, blocks,
                   [](auto& b) -> auto& { return b.upstream_status; });
    s += "},\"d2d\":{";
    s += "\"received\":" + std::to_string(sum(blocks, [](auto& b) -> auto& {
             return b.d2d_received;
         }));
    s += ",\"forwarded\":" + std::to_string(sum(blocks, [](auto& b) -> auto& {
             return b.d2d_forwarded;
         }));
    s += ",\"delivered\":" + std::to_string(sum(blocks, [](auto& b) -> auto& {
             return b.d2d_delivered;
         }));
    s += ",\"status\":";
    append_by_code(s, d2d_codes, blocks,
                   [](auto& b) -> auto& { return b.d2d_status; });
    // Percentiles from the summed histograms: each is the upper edge of
    // the bucket where it falls (at most 19% above the true value).
    std::array<std::uint64_t, latency_histogram::bucket_count> h{};
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < h.size(); ++i) {
        h[i] = sum(blocks,
                   [i](auto& b) -> auto& { return b.d2d_latency.buckets[i]; });
        total += h[i];
    }
    auto percentile = [&](double p) -> double {
        if (!total) return 0;
        auto rank = static_cast<std::uint64_t>(std::ceil(p * total));
        std::uint64_t seen = 0;
        for (std::size_t i = 0; i < h.size(); ++i) {
            seen += h[i];
            if (seen >= rank) return latency_histogram::upper_us(i);
        }
        return latency_histogram::upper_us(h.size() - 1);
    };
    s += ",\"latency_us\":{\"count\":" + std::to_string(total);
    s += ",\"p50\":";
    json::append_number(s, percentile(0.50));
    s += ",\"p99\":";
    json::append_number(s, percentile(0.99));
    s += ",\"p99.9\":";
    json::append_number(s, percentile(0.999));
    // The non-empty buckets, [upper edge in us, count], so that a reader
    // can subtract two readings and take percentiles of an interval.
    s += ",\"buckets\":[";
    bool first = true;
    for (std::size_t i = 0; i < h.size(); ++i) {
        if (!h[i]) continue;
        if (!first) s += ',';
        first = false;
        s += '[';
        json::append_number(s, latency_histogram::upper_us(i));
        s += ',';
        s += std::to_string(h[i]);
        s += ']';
    }
    s += "]}}}";
    return s;
}

}  // namespace pushy
