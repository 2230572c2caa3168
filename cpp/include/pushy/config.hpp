// Node configuration: every limit and timing of a node, with safe defaults.
//
// A NodeConfig is a plain value. It is read by Node::start() on the calling
// thread and copied; changing it afterwards has no effect on a running node.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace pushy {

// The longest device id, in bytes: tokens, pushes and d2d messages name at
// most this many.
inline constexpr std::size_t max_device_bytes = 256;

// Thrown for a configuration that cannot run (bad value, unsupported
// option, port in use). The bindings map it to pushy.ConfigError.
class config_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

struct node_config {
    // Device port (WebSocket). Port 0 picks a free port.
    std::string host = "0.0.0.0";
    std::uint16_t port = 8080;

    // Internal push API (HTTP). Never the device port.
    std::string push_host = "127.0.0.1";
    std::uint16_t push_port = 8081;

    // Token verification. HS256 with `secret` by default; RS256 or ES256
    // with a PEM `public_key`. `audience`, when set, must match `aud`.
    std::string secret;
    std::string public_key;
    std::string algorithm = "HS256";
    std::string audience;

    // TLS on the device port (wss://): the PEM certificate chain (leaf
    // first) and the PEM private key, both files or neither. Empty: plain
    // WebSocket (ws://), for a node behind a TLS terminator.
    std::string tls_cert;
    std::string tls_key;

    // Empty: a random id is chosen at start.
    std::string node_id;

    // Empty: the embedded (in-process) registry.
    // Redis URL of the shared registry; empty runs the embedded registry.
    std::string redis;
    // Prefix of every Redis key, so deployments can share a server.
    std::string redis_prefix = "pushy:";
    // Address of the peer link other nodes and push clients connect to
    // (only with redis); port 0 picks one.
    std::string peer_host = "127.0.0.1";
    std::uint16_t peer_port = 0;
    // TTL of a device record; refreshed every third of it.
    double registry_ttl_s = 30;

    // Number of io threads; 0 picks the number of cores.
    unsigned threads = 1;

    double heartbeat_s = 60;
    double pong_timeout_s = 15;
    double lifetime_s = 1800;
    double upgrade_timeout_s = 10;
    double tls_handshake_timeout_s = 10;
    double close_timeout_s = 5;

    std::size_t max_message_bytes = 64 * 1024;
    std::size_t max_push_bytes = 64 * 1024;
    std::size_t max_header_bytes = 8 * 1024;
    std::size_t max_headers = 64;
    std::size_t max_connections = 0;  // 0: limited only by open files
    // Upgrades (with their TLS handshakes) in progress at once; beyond it
    // the node accepts no more until one ends, and new connections wait in
    // the kernel's listen queue. Bounds the memory and CPU a connection
    // storm takes. 0: no limit.
    std::size_t max_pending_upgrades = 1024;
    // Upgrades accepted per second (a token bucket of `accept_burst`,
    // 0: one second's worth); above it HTTP 503 with Retry-After. 0: no
    // limit.
    double accept_rate = 0;
    std::size_t accept_burst = 0;
    // Bytes a device may leave unread before it is a slow consumer (4003).
    std::size_t max_outbound_bytes = 1 << 20;

    // A connection asked to reconnect (lifetime or drain) that is still
    // open this much later is closed with 1001.
    double reconnect_grace_s = 5;
    // A drain that names no duration (POST /v1/drain without over_s, and
    // SIGTERM of `pushy serve`) spreads the reconnects over this long.
    double drain_s = 10;

    // Allowed Origin values for browsers; empty allows any.
    std::vector<std::string> allowed_origins;

    // Bind the device port with SO_REUSEPORT, so that several node
    // processes on one host share it (the kernel spreads connections over
    // them). Off by default: a second node on the same port is an error.
    bool reuse_port = false;

    // permessage-deflate costs tens of KiB per connection; off by default.
    bool deflate = false;

    // Default timeout of a push that waits for the device's ack.
    double push_timeout_s = 5;

    // Device-to-device: messages per second each connection may send (a
    // token bucket of `d2d_burst`), and the largest `data` of one.
    double d2d_rate = 100;
    std::size_t d2d_burst = 200;
    std::size_t max_d2d_bytes = 16 * 1024;

    // How long a device's route (its node) and a sender's permission to
    // reach a device of another account are trusted without asking Redis.
    // While Redis cannot answer, older entries still serve d2d messages.
    double route_cache_ttl_s = 10;

    // Connection events (with redis): entries the node appends to the
    // {redis_prefix}events stream are trimmed to about this many (XADD
    // MAXLEN ~), and so are the service streams of upstream sends. 0: the
    // node writes no events (and leaves service streams untrimmed).
    std::size_t events_maxlen = 1000000;

    // Throws config_error naming the first invalid field.
    void validate() const;
};

}  // namespace pushy
