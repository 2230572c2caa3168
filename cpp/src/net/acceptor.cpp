#include "net/acceptor.hpp"

#include <boost/asio/post.hpp>

#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>

#include "core/logging.hpp"
#include "core/stats.hpp"
#include "pushy/config.hpp"

namespace pushy {

namespace net = boost::asio;
using boost::system::error_code;

acceptor::acceptor(net::io_context& ioc, const std::string& host,
                   std::uint16_t port, std::string what, bool shared)
    : acceptor_(ioc), backoff_(ioc), what_(std::move(what)) {
    error_code ec;
    auto addr = net::ip::make_address(host, ec);
    if (ec) {
        throw config_error(what_ + " host '" + host +
                           "' is not an IP address");
    }
    tcp::endpoint ep(addr, port);
    acceptor_.open(ep.protocol(), ec);
    if (!ec) acceptor_.set_option(tcp::acceptor::reuse_address(true), ec);
    if (!ec && shared) {
        // Several node processes on one host share the device port.
        int one = 1;
        if (::setsockopt(acceptor_.native_handle(), SOL_SOCKET, SO_REUSEPORT,
                         &one, sizeof one) != 0) {
            ec.assign(errno, boost::system::system_category());
        }
    }
    if (!ec) acceptor_.bind(ep, ec);
    if (!ec) acceptor_.listen(net::socket_base::max_listen_connections, ec);
    if (ec) {
        throw config_error("cannot listen on " + what_ + " " + host + ":" +
                           std::to_string(port) + ": " + ec.message());
    }
    reserve_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
}

acceptor::~acceptor() {
    if (reserve_fd_ >= 0) ::close(reserve_fd_);
}

void acceptor::shed() {
    if (reserve_fd_ >= 0) {
        ::close(reserve_fd_);
        reserve_fd_ = -1;
    }
    int fd = ::accept4(acceptor_.native_handle(), nullptr, nullptr,
                       SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
        ::close(fd);
        ++dropped_;
        if (stats_) stats_->count(reject::out_of_files);
    }
    reserve_fd_ = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    auto now = std::chrono::steady_clock::now();
    auto dropped = dropped_;
    if (dropped != dropped_said_ && now - said_at_ >= std::chrono::seconds(10)) {
        PUSHY_WARN("{}: out of file descriptors (the open-file limit): {} "
                   "connection{} closed unanswered so far",
                   what_, dropped, dropped == 1 ? "" : "s");
        dropped_said_ = dropped;
        said_at_ = now;
    }
}

std::uint16_t acceptor::port() const {
    error_code ec;
    return acceptor_.local_endpoint(ec).port();
}

void acceptor::start(std::function<net::io_context&()> pick, on_socket fn) {
    pick_ = std::move(pick);
    fn_ = std::move(fn);
    do_accept();
}

void acceptor::limit(std::atomic<std::size_t>* in_progress,
                     std::size_t limit) {
    in_progress_ = in_progress;
    limit_ = limit;
}

void acceptor::stop() {
    error_code ec;
    acceptor_.close(ec);
    backoff_.cancel();
}

void acceptor::do_accept() {
    if (in_progress_ && limit_ != 0 &&
        in_progress_->load(std::memory_order_relaxed) >= limit_) {
        // Full: look again in a millisecond (the kernel queues meanwhile).
        backoff_.expires_after(std::chrono::milliseconds(1));
        backoff_.async_wait([this](error_code e) {
            if (!e && acceptor_.is_open()) do_accept();
        });
        return;
    }
    auto& target = pick_();
    acceptor_.async_accept(target, [this, &target](error_code ec,
                                                   tcp::socket s) {
        if (ec == net::error::operation_aborted || !acceptor_.is_open()) {
            return;
        }
        if (ec == net::error::no_descriptors ||
            ec.value() == ENFILE) {
            // Out of descriptors: close the waiting connections (a client
            // sees its connection end and retries, maybe on another node)
            // rather than leave them hanging; look again shortly.
            shed();
            backoff_.expires_after(std::chrono::milliseconds(10));
            backoff_.async_wait([this](error_code e) {
                if (!e) do_accept();
            });
            return;
        }
        if (ec) {
            // A transient error: wait a little rather than spin.
            PUSHY_WARN("{}: accept failed: {}", what_, ec.message());
            backoff_.expires_after(std::chrono::milliseconds(50));
            backoff_.async_wait([this](error_code e) {
                if (!e) do_accept();
            });
            return;
        }
        if (in_progress_) {
            in_progress_->fetch_add(1, std::memory_order_relaxed);
        }
        net::post(target, [this, s = std::move(s)]() mutable {
            fn_(std::move(s));
        });
        do_accept();
    });
}

}  // namespace pushy
