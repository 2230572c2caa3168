#include "pushy/config.hpp"

#include <string>

namespace pushy {

namespace {

void require(bool ok, const std::string& message) {
    if (!ok) throw config_error(message);
}

}  // namespace

// Checks every field a node depends on; the message names the field and
// what it expects.
void node_config::validate() const {
    bool hs = algorithm.starts_with("HS");
    require(algorithm == "HS256" || algorithm == "HS384" ||
                algorithm == "HS512" || algorithm == "RS256" ||
                algorithm == "ES256",
            "algorithm must be one of HS256, HS384, HS512, RS256, ES256");
    require(!hs || !secret.empty(),
            "secret is required to verify " + algorithm + " device tokens");
    require(hs || !public_key.empty(),
            "public_key (PEM) is required to verify " + algorithm +
                " device tokens");
    require(!redis_prefix.empty() && redis_prefix.size() <= 64 &&
                redis_prefix.find_first_of(" \t\r\n{}") == std::string::npos,
            "redis_prefix must be 1 to 64 bytes without blanks or braces");
    require(registry_ttl_s >= 1 && registry_ttl_s <= 86400,
            "registry_ttl_s must be between 1 and 86400");
    require(node_id.find_first_of(" \t\r\n") == std::string::npos,
            "node_id must not contain blanks");
    require(!deflate,
            "deflate (permessage-deflate) is not supported by this version");
    require(threads <= 256, "threads must be between 0 and 256");
    require(heartbeat_s > 0 && heartbeat_s <= 86400,
            "heartbeat_s must be above 0 and at most 86400");
    require(pong_timeout_s > 0 && pong_timeout_s <= 86400,
            "pong_timeout_s must be above 0 and at most 86400");
    require(lifetime_s > 0 && lifetime_s <= 31536000,
            "lifetime_s must be above 0 and at most 31536000 (365 days)");
    require(upgrade_timeout_s > 0 && upgrade_timeout_s <= 3600,
            "upgrade_timeout_s must be above 0 and at most 3600");
    require(tls_handshake_timeout_s > 0 && tls_handshake_timeout_s <= 3600,
            "tls_handshake_timeout_s must be above 0 and at most 3600");
    require(tls_cert.empty() == tls_key.empty(),
            "tls_cert and tls_key go together: set both for TLS, or "
            "neither");
    require(close_timeout_s > 0 && close_timeout_s <= 3600,
            "close_timeout_s must be above 0 and at most 3600");
    require(push_timeout_s > 0 && push_timeout_s <= 3600,
            "push_timeout_s must be above 0 and at most 3600");
    require(d2d_rate > 0, "d2d_rate must be positive");
    require(route_cache_ttl_s > 0 && route_cache_ttl_s <= 3600,
            "route_cache_ttl_s must be above 0 and at most 3600");
    require(d2d_burst >= 1 && d2d_burst <= 1000000,
            "d2d_burst must be between 1 and 1000000");
    require(max_d2d_bytes >= 1 && max_d2d_bytes <= (8u << 20),
            "max_d2d_bytes must be between 1 byte and 8 MiB");
    require(events_maxlen <= 1000000000,
            "events_maxlen must be between 0 and 1000000000");
    require(accept_rate >= 0 && accept_rate <= 10000000,
            "accept_rate must be between 0 and 10000000");
    require(accept_burst <= 10000000,
            "accept_burst must be between 0 and 10000000");
    require(max_outbound_bytes >= 4096 && max_outbound_bytes <= (1u << 30),
            "max_outbound_bytes must be between 4 KiB and 1 GiB");
    require(reconnect_grace_s > 0 && reconnect_grace_s <= 3600,
            "reconnect_grace_s must be above 0 and at most 3600");
    require(drain_s >= 0 && drain_s <= 86400,
            "drain_s must be between 0 and 86400");
    require(max_message_bytes >= 16 && max_message_bytes <= (64u << 20),
            "max_message_bytes must be between 16 and 64 MiB");
    require(max_push_bytes >= 1 && max_push_bytes <= (8u << 20),
            "max_push_bytes must be between 1 byte and 8 MiB");
    require(max_header_bytes >= 256 && max_header_bytes <= (1u << 20),
            "max_header_bytes must be between 256 and 1 MiB");
    require(max_pending_upgrades <= 1000000,
            "max_pending_upgrades must be between 0 and 1000000");
    require(max_headers >= 8 && max_headers <= 10000,
            "max_headers must be between 8 and 10000");
    require(port == 0 || port != push_port || host != push_host,
            "port and push_port must differ");
    require(node_id.size() <= 128, "node_id must be at most 128 bytes");
}

}  // namespace pushy
