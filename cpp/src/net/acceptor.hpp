// A listening socket (device port or push port) that spreads accepted
// connections over the io threads.
//
// Threading: the acceptor runs on io thread 0; each accepted socket is
// handed to the thread it was accepted into with a post.
#pragma once

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace pushy {

class node_impl;

// A listening socket that accepts forever, backing off briefly when the
// process runs out of file descriptors instead of spinning.
class acceptor {
public:
    using tcp = boost::asio::ip::tcp;
    using on_socket = std::function<void(tcp::socket)>;

    // Binds host:port (port 0 picks one) with SO_REUSEADDR, and with
    // SO_REUSEPORT when `shared` (node processes sharing the device port).
    // Throws config_error naming `what` if it cannot.
    acceptor(boost::asio::io_context& ioc, const std::string& host,
             std::uint16_t port, std::string what, bool shared);

    // Accepts into the io_context chosen by `pick` and calls `fn` there.
    void start(std::function<boost::asio::io_context&()> pick, on_socket fn);

    // Counts each accepted socket in `*in_progress` (whose consumer counts
    // it down when done with it) and accepts no more while it is at
    // `limit`: new connections wait in the kernel's listen queue, which
    // costs this process nothing. Call before start().
    void limit(std::atomic<std::size_t>* in_progress, std::size_t limit);

    // Stops accepting. Call on the acceptor's thread.
    void stop();

    std::uint16_t port() const;

private:
    void do_accept();

    tcp::acceptor acceptor_;
    boost::asio::steady_timer backoff_;
    std::string what_;
    std::function<boost::asio::io_context&()> pick_;
    on_socket fn_;
    std::atomic<std::size_t>* in_progress_ = nullptr;
    std::size_t limit_ = 0;
};

}  // namespace pushy
