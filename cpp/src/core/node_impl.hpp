// The running node: io threads, the connection table, the two servers.
// Internal; the public face is pushy::node (include/pushy/node.hpp).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <string>
#include <vector>

#include "auth/jwt_verifier.hpp"
#include "core/connection_table.hpp"
#include "core/io_thread.hpp"
#include "core/stats.hpp"
#include "net/push_request.hpp"
#include "pushy/config.hpp"
#include "routing/d2d.hpp"

namespace pushy {

class device_server;
class push_server;
class fleet;
namespace tls {
class context;
}


class node_impl {
public:
    explicit node_impl(node_config cfg);
    ~node_impl();

    // Binds both ports and starts the io threads. Throws config_error.
    void start();

    // Closes every device with 1001, waits for the closes up to the close
    // timeout, then stops the threads. Idempotent. Not from an io thread.
    void stop();

    const node_config& config() const noexcept { return cfg_; }
    const std::string& node_id() const noexcept { return node_id_; }
    const auth::jwt_verifier& verifier() const noexcept { return *verifier_; }
    connection_table& table() noexcept { return table_; }
    std::uint16_t port() const noexcept { return port_; }
    std::uint16_t push_port() const noexcept { return push_port_; }
    // The peer-link port (0 without redis).
    std::uint16_t peer_port() const noexcept;
    // The fleet on Redis, or null on the embedded registry.
    pushy::fleet* fleet() noexcept { return fleet_.get(); }
    // The device port's TLS context, or null for plain WebSocket.
    const tls::context* tls() const noexcept { return tls_.get(); }
    // Devices this node takes: max_connections, or when that is 0, what
    // the open-file limit leaves once the node's own sockets and the
    // upgrades in progress have theirs.
    std::size_t max_connections() const noexcept { return max_connections_; }

    // Sends a push to `device` if it is connected to this node; `done` then
    // runs on `home` once the outcome is known. Returns false (and never
    // calls `done`) when the device is not connected here. A non-empty
    // `msg_id` (a queued message's id) is the frame's id and what the
    // device acks, instead of the numeric push id.
    bool deliver_local(io_thread& home, const std::string& device,
                       std::string_view data, std::string_view from,
                       bool want_ack, std::chrono::milliseconds timeout,
                       local_push_done done, std::string_view msg_id = {});

    // Sends a device-to-device message from a device connected here to its
    // target, here or on another node; `done` runs on `home`.
    void send_d2d(io_thread& home, d2d_message m, d2d_done done);

    // Delivers a d2d message to its target if it is connected here (the
    // sender is already authorized); `done` runs on `home`. Returns false
    // (and never calls `done`) when the target is not connected here.
    // `within` bounds the write (push_timeout_s otherwise).
    bool deliver_d2d(io_thread& home, const d2d_message& m, d2d_done done,
                     std::optional<std::chrono::milliseconds> within = {});

    // Where an event frame went (deliver_event).
    enum class event_target { queued, not_connected, gone };

    // Writes `frame` (a complete JSON text frame, sent as it is) to
    // `device`'s connection here if there is one and, when `conn` is not 0,
    // it is connection `conn`; `done` then runs on `home` with the outcome.
    // Otherwise returns not_connected or gone (a newer connection of the
    // device holds the table) and never calls `done`.
    event_target deliver_event(io_thread& home, const std::string& device,
                               std::uint64_t conn, std::string frame,
                               std::chrono::milliseconds timeout,
                               local_push_done done);
    bool running() const noexcept { return running_; }

    // The io thread for the next accepted socket (round robin).
    io_thread& next_thread() noexcept;
    io_thread& thread(std::size_t i) noexcept { return *threads_[i]; }
    std::size_t thread_count() const noexcept { return threads_.size(); }

    std::uint64_t next_push_id() noexcept {
        return push_ids_.fetch_add(1, std::memory_order_relaxed);
    }
    std::uint64_t next_connection_id() noexcept {
        return conn_ids_.fetch_add(1, std::memory_order_relaxed);
    }

    // Upgrades in progress, and sessions not yet closed (stop() waits for
    // the closing handshakes to end).
    std::atomic<std::size_t> pending_upgrades{0};
    std::atomic<std::size_t> live_sessions{0};

    // The io thread whose io_context is `ioc`.
    io_thread& thread_of(boost::asio::io_context& ioc) noexcept;

    // The /v1/stats document.
    std::string stats_json() const;

    // True once stop() began: new upgrades are refused with 503.
    bool stopping() const noexcept {
        return stopping_.load(std::memory_order_relaxed);
    }

    // Starts a drain (any thread): new upgrades are refused with 503, every
    // connected device is sent {"t":"reconnect","reason":"drain"} at a time
    // spread evenly over `over_s`, and the node stops itself once no device
    // is left, or `over_s` + reconnect_grace_s after the start at the
    // latest. Returns false (and does nothing) when the node is not running
    // or already drains.
    bool drain(double over_s);
    // True from drain() on.
    bool draining() const noexcept {
        return draining_.load(std::memory_order_relaxed);
    }
    // The "drain" object of /v1/stats.
    std::string drain_json() const;

private:
    void release() noexcept;
    void set_connection_limit();
    // Waits, on its own thread, until the drain is over; then stops.
    void watch_drain();

    node_config cfg_;
    std::string node_id_;
    std::unique_ptr<auth::jwt_verifier> verifier_;
    std::unique_ptr<tls::context> tls_;
    std::size_t max_connections_ = 0;
    // Upgrades in progress the acceptor allows (0: no limit).
    std::size_t pending_limit_ = 0;
    connection_table table_;
    std::vector<std::unique_ptr<io_thread>> threads_;
    std::unique_ptr<device_server> devices_;
    std::unique_ptr<push_server> pushes_;
    std::unique_ptr<pushy::fleet> fleet_;
    std::atomic<std::size_t> rr_{0};
    std::atomic<std::uint64_t> push_ids_{1};
    std::atomic<std::uint64_t> conn_ids_{1};
    std::uint16_t port_ = 0;
    std::uint16_t push_port_ = 0;
    std::atomic<bool> running_{false};
    std::atomic<bool> stopping_{false};
    // stop() may come from the owner and from the drain watcher at once.
    std::mutex stop_mutex_;
    mutable std::mutex drain_mutex_;
    std::atomic<bool> draining_{false};
    std::thread drain_watcher_;
    // Set by drain() before draining_ (and read only once it is true).
    std::chrono::steady_clock::time_point drain_started_;
    double drain_over_s_ = 0;
    std::size_t drain_devices_ = 0;
    std::atomic<bool> drain_done_{false};
    std::chrono::steady_clock::time_point started_at_;
};

}  // namespace pushy
