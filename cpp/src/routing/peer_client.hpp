// Outgoing peer links: one persistent TCP connection per node address,
// requests pipelined on it, replies matched by id.
//
// Threading: every member runs on the io_context's thread; replies too.
// A request is always answered: by the peer, or with 503 when the peer
// cannot be reached (or the link breaks before the answer), or with 504
// when the answer does not come within the request's timeout.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include "routing/peer_codec.hpp"

namespace pushy::peer {

using reply_fn = std::function<void(const reply&)>;

class client_pool {
public:
    explicit client_pool(boost::asio::io_context& ioc);
    ~client_pool();
    client_pool(const client_pool&) = delete;
    client_pool& operator=(const client_pool&) = delete;

    // Sends `req` (its id is assigned here) to the node at "host:port".
    void send(const std::string& address, request req,
              std::chrono::milliseconds timeout, reply_fn done);

    // Closes every link; pending requests are answered 503.
    void stop();

    // Requests waiting for an answer on one link before new ones are
    // refused with 503 (the peer is not keeping up).
    std::size_t max_in_flight = 65536;

    struct link;

private:
    void sweep();

    boost::asio::io_context& ioc_;
    boost::asio::steady_timer sweep_timer_;
    std::unordered_map<std::string, std::shared_ptr<link>> links_;
    std::uint64_t next_id_ = 1;
    bool stopped_ = false;
    bool sweep_timer_armed_ = false;
};

// A failure answer made locally (no peer involved).
reply local_reply(std::uint16_t code, std::string_view status,
                  std::string_view reason);

}  // namespace pushy::peer
