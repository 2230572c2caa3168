#include "routing/peer_client.hpp"

#include <boost/asio/connect.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>

#include <vector>

#include "core/logging.hpp"

namespace pushy::peer {

namespace net = boost::asio;
using boost::system::error_code;
using tcp = net::ip::tcp;
using clock = std::chrono::steady_clock;

reply local_reply(std::uint16_t code, std::string_view status,
                  std::string_view reason) {
    reply r;
    r.code = code;
    r.status = std::string(status);
    r.reason = std::string(reason);
    return r;
}

// One connection to one peer. Requests written while it connects wait in
// `out_`; one write is in flight at a time and everything queued behind it
// goes out in the next one.
struct client_pool::link : std::enable_shared_from_this<link> {
    enum class state { down, connecting, up };

    struct waiting {
        clock::time_point deadline;
        reply_fn done;
    };

    link(net::io_context& ioc, std::string address)
        : socket(ioc), address(std::move(address)) {}

    tcp::socket socket;
    std::string address;
    // Bumped on every connection attempt: handlers of an older socket
    // find a different value and do nothing.
    unsigned gen = 0;
    state st = state::down;
    clock::time_point failed_at{};
    std::string out;       // queued frames
    std::string writing;   // the frames of the write in flight
    bool write_busy = false;
    std::vector<char> rbuf = std::vector<char>(16 * 1024);
    frame_reader reader;
    std::unordered_map<std::uint64_t, waiting> pending;

    void start_connect() {
        tcp::endpoint ep;
        auto colon = address.rfind(':');
        error_code ec;
        if (colon != std::string::npos) {
            auto ip = net::ip::make_address(address.substr(0, colon), ec);
            unsigned long port = 0;
            try {
                port = std::stoul(address.substr(colon + 1));
            } catch (...) {
                ec = net::error::invalid_argument;
            }
            if (!ec && port > 0 && port < 65536) {
                ep = tcp::endpoint(ip, static_cast<unsigned short>(port));
            } else {
                ec = net::error::invalid_argument;
            }
        } else {
            ec = net::error::invalid_argument;
        }
        if (ec) return fail("bad peer address '" + address + "'");
        st = state::connecting;
        socket.async_connect(ep, [self = shared_from_this(),
                                  g = gen](error_code ec) {
            if (g == self->gen) self->on_connect(ec);
        });
    }

    void on_connect(error_code ec) {
        if (st != state::connecting) return;
        if (ec) return fail("peer " + address + " unreachable: " + ec.message());
        error_code ignored;
        socket.set_option(tcp::no_delay(true), ignored);
        st = state::up;
        do_read();
        flush();
    }

    // Answers everything pending with 503 and forgets the connection.
    void fail(const std::string& why, bool quiet = false) {
        if (st == state::up && !quiet) {
            PUSHY_WARN("peer link to {} lost: {}", address, why);
        } else {
            PUSHY_DEBUG("{}", why);
        }
        st = state::down;
        ++gen;
        failed_at = clock::now();
        error_code ignored;
        socket.close(ignored);
        out.clear();
        writing.clear();
        write_busy = false;
        reader = frame_reader();
        auto waiting = std::move(pending);
        pending.clear();
        auto r = local_reply(503, "unavailable", why);
        for (auto& [id, w] : waiting) {
            r.id = id;
            w.done(r);
        }
    }

    void flush() {
        if (write_busy || st != state::up || out.empty()) return;
        write_busy = true;
        writing.swap(out);
        net::async_write(socket, net::buffer(writing),
                         [self = shared_from_this(), g = gen](error_code ec,
                                                              std::size_t) {
                             if (g != self->gen) return;
                             self->write_busy = false;
                             self->writing.clear();
                             if (ec) {
                                 if (self->st == state::up) {
                                     self->fail(ec.message());
                                 }
                                 return;
                             }
                             self->flush();
                         });
    }

    void do_read() {
        socket.async_read_some(
            net::buffer(rbuf),
            [self = shared_from_this(), g = gen](error_code ec, std::size_t n) {
                if (g == self->gen) self->on_read(ec, n);
            });
    }

    void on_read(error_code ec, std::size_t n) {
        if (st != state::up) return;
        if (ec) return fail(ec == net::error::eof ? "closed by peer"
                                                  : ec.message());
        reader.feed(rbuf.data(), n);
        request req;
        reply rep;
        for (;;) {
            auto got = reader.next(req, rep);
            if (got == frame_reader::result::none) break;
            if (got != frame_reader::result::reply) {
                return fail(got == frame_reader::result::error
                                ? reader.error_text()
                                : "peer sent a request on a client link");
            }
            auto it = pending.find(rep.id);
            if (it == pending.end()) continue;  // answered 504 already
            auto done = std::move(it->second.done);
            pending.erase(it);
            done(rep);
        }
        do_read();
    }
};

client_pool::client_pool(net::io_context& ioc)
    : ioc_(ioc), sweep_timer_(ioc) {}

client_pool::~client_pool() { stop(); }

void client_pool::send(const std::string& address, request req,
                       std::chrono::milliseconds timeout, reply_fn done) {
    req.id = next_id_++;
    if (req.deadline_ms == 0 && timeout.count() > 0) {
        // The receiver must not deliver once this side has given up: it
        // stops a margin before the timeout, so that its answer arrives.
        auto margin = std::min<std::int64_t>(timeout.count() / 4, 500);
        req.deadline_ms = wall_ms() + static_cast<std::uint64_t>(
                                          timeout.count() - margin);
    }
    if (stopped_) {
        auto r = local_reply(503, "unavailable", "push client is stopped");
        r.id = req.id;
        return done(r);
    }
    auto& l = links_[address];
    if (!l) l = std::make_shared<link>(ioc_, address);
    if (l->st == link::state::down) {
        // A peer that just failed is not tried again for a moment, so a
        // dead node's pushes are answered at once instead of each waiting
        // for a connection attempt.
        if (clock::now() - l->failed_at < std::chrono::milliseconds(200)) {
            auto r = local_reply(503, "unavailable",
                                 "peer " + address + " unreachable");
            r.id = req.id;
            return done(r);
        }
        l->socket = tcp::socket(ioc_);
        l->start_connect();
        if (l->st == link::state::down) {  // bad address
            auto r = local_reply(503, "unavailable",
                                 "bad peer address '" + address + "'");
            r.id = req.id;
            return done(r);
        }
    }
    if (l->pending.size() >= max_in_flight) {
        auto r = local_reply(503, "unavailable",
                             "too many requests in flight to " + address);
        r.id = req.id;
        return done(r);
    }
    encode(l->out, req);
    l->pending.emplace(req.id,
                       link::waiting{clock::now() + timeout, std::move(done)});
    l->flush();
    if (!sweep_timer_armed_) sweep();
}

// Answers 504 to every request past its deadline, every 50 ms while any
// request is pending.
void client_pool::sweep() {
    auto now = clock::now();
    bool any = false;
    for (auto& [address, l] : links_) {
        std::vector<std::uint64_t> late;
        for (auto& [id, w] : l->pending) {
            if (w.deadline <= now) late.push_back(id);
        }
        for (auto id : late) {
            auto it = l->pending.find(id);
            auto done = std::move(it->second.done);
            l->pending.erase(it);
            auto r = local_reply(504, "timeout",
                                 "no answer from peer " + address);
            r.id = id;
            done(r);
        }
        any = any || !l->pending.empty();
    }
    sweep_timer_armed_ = any;
    if (!any) return;
    sweep_timer_.expires_after(std::chrono::milliseconds(50));
    sweep_timer_.async_wait([this](error_code ec) {
        if (ec) return;
        sweep();
    });
}

void client_pool::stop() {
    if (stopped_) return;
    stopped_ = true;
    sweep_timer_.cancel();
    for (auto& [address, l] : links_) {
        if (l->st != link::state::down) l->fail("stopped", true);
    }
    links_.clear();
}

}  // namespace pushy::peer
