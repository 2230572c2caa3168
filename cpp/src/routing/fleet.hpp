// A node's part in a fleet on Redis: it registers its devices in the Push
// Registry (and keeps their records alive), announces itself in the node
// directory, serves peer links, and routes pushes for devices connected to
// other nodes.
//
// Threading: the Redis client, the registry, the router and the outgoing
// peer links all run on io thread 0 (the "home" thread); the public calls
// below may come from any io thread and post there. Peer-link connections
// from other nodes are served on every io thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "core/io_thread.hpp"
#include "routing/d2d.hpp"
#include "routing/peer_codec.hpp"

namespace pushy {

class node_impl;
class session;

// A device's message to a service (DESIGN section 3), checked by the
// session.
struct upstream_message {
    std::string service;  // NAME of "service:NAME"
    std::string msg_id;   // the device's id, a string
    std::string data;     // validated JSON text, passed through
};

class fleet {
public:
    fleet(node_impl& node, io_thread& home);
    ~fleet();

    // Checks the Redis URL and credentials (config_error), warns when Redis
    // cannot be reached yet, and binds the peer port (config_error). The
    // io threads are not running yet.
    void bind();
    // Connects to Redis and starts the timers; call once the threads run.
    void start();
    // Removes the node from the directory and drops every link. Blocks
    // until done; not from an io thread.
    void stop();

    std::uint16_t peer_port() const noexcept;
    const std::string& peer_address() const noexcept { return address_; }

    // A device connected to this node (any io thread): writes its record,
    // then its `connected` event carrying `meta` (the token's meta JSON
    // text, empty for none), which is dropped once the event is queued;
    // `registered` then runs on the home thread, whatever the outcome.
    void connected(const session& s, std::string meta,
                   std::function<void()> registered);
    // A device left this node (any io thread): deletes its record if
    // `owner` (the connection was still the table's entry for the device)
    // and the connection still owns it, then writes its `disconnected`
    // event.
    void disconnected(const session& s, bool owner);

    // Appends a device's upstream message to the service's stream,
    // {prefix}svc:<service>. `done` runs on `caller`: 202 once Redis has
    // it, 503 otherwise.
    void send_upstream(io_thread& caller, const session& s,
                       upstream_message m, d2d_done done);

    // Appends a `subscribe` or `unsubscribe` entry (`kind`) for `topic` to
    // the events stream. `done` runs on `caller`: 202 once Redis has it,
    // 503 otherwise.
    void subscription(io_thread& caller, const session& s,
                      std::string_view kind, std::string_view topic,
                      d2d_done done);

    // Routes a push for a device that is not connected here. `done` runs on
    // `caller` with the answer (any code, with the name of the node that
    // gave it).
    void push(io_thread& caller, peer::request req,
              std::chrono::milliseconds timeout,
              std::function<void(peer::reply)> done);

    // Sends a d2d message to a target not connected here: route (cache,
    // then registry), authorization (same account, or the sender's
    // allow-list), then the target's node over a peer link. `done` runs on
    // `caller`.
    void d2d(io_thread& caller, d2d_message m, d2d_done done);

    // Whether `sender` may reach `target` of another account: its allow-
    // list in Redis ({prefix}allow:{<sender>}, a set of device ids),
    // cached. `done` runs on `caller` with 1 (yes), 0 (no) or -1 (Redis
    // cannot answer).
    void allowed(io_thread& caller, const std::string& sender,
                 const std::string& target, std::function<void(int)> done);

    // The "fleet" object of /v1/stats.
    std::string stats_json() const;

    struct impl;

private:
    std::unique_ptr<impl> impl_;
    std::string address_;
};

}  // namespace pushy
