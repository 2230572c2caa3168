// A listening socket (device port or push port) that spreads accepted
// connections over the io threads.
//
// Threading: the acceptor runs on io thread 0; each accepted socket is
// handed to the thread it was accepted into with a post.
#pragma once

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace pushy {

class node_impl;
struct counters;

// A listening socket that accepts forever. When the process runs out of
// file descriptors it still takes each waiting connection off the listen
// queue and closes it at once (with a descriptor kept in reserve for
// that), so clients learn it and try again, instead of hanging in a queue
// that no longer moves.
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

    // Counts each connection closed unanswered for want of a descriptor as
    // reject `out_of_files` in `stats` (the acceptor's io thread's).
    void count_into(counters* stats) noexcept { stats_ = stats; }

    // Stops accepting. Call on the acceptor's thread.
    void stop();


    std::uint16_t port() const;

    ~acceptor();

private:
    void do_accept();
    // Out of descriptors: closes the oldest waiting connection with the
    // reserve descriptor's place, and says so (at most every 10 s).
    void shed();

    tcp::acceptor acceptor_;
    boost::asio::steady_timer backoff_;
    std::string what_;
    std::function<boost::asio::io_context&()> pick_;
    on_socket fn_;
    std::atomic<std::size_t>* in_progress_ = nullptr;
    std::size_t limit_ = 0;
    int reserve_fd_ = -1;  // /dev/null, given up to accept-and-close
    counters* stats_ = nullptr;
    std::uint64_t dropped_ = 0;
    std::uint64_t dropped_said_ = 0;
    std::chrono::steady_clock::time_point said_at_{};
};

}  // namespace pushy
