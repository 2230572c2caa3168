// A node: the WebSocket server devices connect to, and the internal HTTP
// push API services use, in one process.
//
// Threading: start(), stop() and the accessors are called from the owning
// (non-io) thread. start() returns once both ports listen; the node runs on
// its own io threads until stop().
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "pushy/config.hpp"

namespace pushy {

class node_impl;

class node {
public:
    explicit node(node_config cfg);
    ~node();
    node(const node&) = delete;
    node& operator=(const node&) = delete;

    // Validates the configuration, binds the device and push ports and
    // starts the io threads. Throws config_error.
    void start();

    // Closes every device with 1001 (going away), waits up to the close
    // timeout for the closing handshakes, and stops. Idempotent.
    void stop();

    // Drains the node: it stops listening on the device port (upgrades
    // under way are refused with 503), every connected
    // device is asked to reconnect at a time spread evenly over `over_s`
    // ({"t":"reconnect","reason":"drain"}), and the node stops itself when
    // none is left, or over_s + reconnect_grace_s from now at the latest.
    // Any thread. Returns false when not running or already draining.
    bool drain(double over_s);
    bool draining() const noexcept;

    bool running() const noexcept;
    std::uint16_t port() const noexcept;
    std::uint16_t push_port() const noexcept;
    // The peer-link port; 0 on the embedded registry.
    std::uint16_t peer_port() const noexcept;
    const std::string& node_id() const noexcept;
    std::size_t connections() const noexcept;

    // The stats document served at GET /v1/stats.
    std::string stats_json() const;

private:
    std::unique_ptr<node_impl> impl_;
};

}  // namespace pushy
