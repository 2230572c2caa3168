#include "pushy/node.hpp"

#include <boost/asio/post.hpp>

#include <openssl/rand.h>

#include <sys/resource.h>

#include <future>

#include "core/logging.hpp"
#include "core/node_impl.hpp"
#include "detail/json_out.hpp"
#include "http/push_server.hpp"
#include "net/acceptor.hpp"
#include "net/session.hpp"
#include "net/tls.hpp"
#include "net/upgrade.hpp"
#include "routing/fleet.hpp"

namespace pushy {

namespace net = boost::asio;

class device_server : public acceptor {
    using acceptor::acceptor;
};
class push_server : public acceptor {
    using acceptor::acceptor;
};

namespace {

// A node id for a node configured without one: "node-" and 8 hex digits.
std::string random_node_id() {
    unsigned char b[4];
    RAND_bytes(b, sizeof b);
    static constexpr char hex[] = "0123456789abcdef";
    std::string id = "node-";
    for (auto c : b) {
        id += hex[c >> 4];
        id += hex[c & 0xF];
    }
    return id;
}

// The frame a device receives for a push (DESIGN section 3). `data` is
// validated JSON text, passed through.
// A queued message carries its own `msg_id` (a string, the same on every
// delivery attempt, so the device can drop duplicates); other pushes use
// the node's numeric push id.
std::string push_frame(std::uint64_t id, std::string_view msg_id,
                       std::string_view from, std::string_view data,
                       bool want_ack) {
    std::string f;
    f.reserve(64 + data.size() + from.size() + msg_id.size());
    f += R"({"t":"push","id":)";
    if (msg_id.empty()) {
        f += std::to_string(id);
    } else {
        json::append_string(f, msg_id);
    }
    f += R"(,"from":)";
    if (from.starts_with("service:")) {
        json::append_string(f, from);
    } else {
        json::append_string(f, "service:" + std::string(from));
    }
    f += R"(,"data":)";
    f += data;
    f += want_ack ? R"(,"ack":true})" : R"(,"ack":false})";
    return f;
}

}  // namespace

node_impl::node_impl(node_config cfg) : cfg_(std::move(cfg)) {}

std::uint16_t node_impl::peer_port() const noexcept {
    return fleet_ ? fleet_->peer_port() : 0;
}

void push_done::operator()(push_outcome o, std::string_view reason) {
    net::post(home->ioc, [o, id = id, r = std::string(reason),
                          fn = std::move(fn)]() mutable { fn(o, id, r); });
}

// Queues `req` on session `s`; its outcome reaches `done` on `home`.
static void deliver_to(io_thread& home, std::shared_ptr<session> s,
                       push_request req, local_push_done done) {
    req.done = push_done{&home, req.id, std::move(done)};
    auto& ctx = s->context();  // before `s` moves into the handler
    net::post(ctx, [s = std::move(s), req = std::move(req)]() mutable {
        s->deliver(std::move(req));
    });
}

bool node_impl::deliver_local(io_thread& home, const std::string& device,
                              std::string_view data, std::string_view from,
                              bool want_ack, std::chrono::milliseconds timeout,
                              local_push_done done, std::string_view msg_id) {
    auto s = table_.find(device);
    if (!s) return false;
    push_request req;
    req.id = next_push_id();
    req.msg_id = msg_id;
    req.frame = push_frame(req.id, msg_id, from, data, want_ack);
    req.want_ack = want_ack;
    req.timeout = timeout;
    deliver_to(home, std::move(s), std::move(req), std::move(done));
    return true;
}

node_impl::event_target node_impl::deliver_event(
    io_thread& home, const std::string& device, std::uint64_t conn,
    std::string frame, std::chrono::milliseconds timeout,
    local_push_done done) {
    auto s = table_.find(device);
    if (!s) return event_target::not_connected;
    if (conn != 0 && s->id() != conn) return event_target::gone;
    push_request req;
    req.frame = std::move(frame);
    req.timeout = timeout;
    deliver_to(home, std::move(s), std::move(req), std::move(done));
    return event_target::queued;
}

std::string d2d_frame(const d2d_message& m) {
    std::string f;
    f.reserve(48 + m.msg_id.size() + m.from.size() + m.data.size());
    f += R"({"t":"d2d","id":)";
    f += m.msg_id;
    f += R"(,"from":)";
    json::append_string(f, m.from);
    f += R"(,"data":)";
    f += m.data;
    f += '}';
    return f;
}

bool node_impl::deliver_d2d(io_thread& home, const d2d_message& m,
                            d2d_done done,
                            std::optional<std::chrono::milliseconds> within) {
    auto s = table_.find(m.to);
    if (!s) return false;
    push_request req;
    req.frame = d2d_frame(m);
    req.timeout = std::chrono::milliseconds(
        static_cast<long>(cfg_.push_timeout_s * 1000));
    if (within && *within < req.timeout) req.timeout = *within;
    deliver_to(home, std::move(s), std::move(req),
               [home = &home, done = std::move(done)](
                   push_outcome o, std::uint64_t, std::string_view why) {
                   if (o == push_outcome::delivered) {
                       counters::bump(home->stats.d2d_delivered);
                       return done(200, {});
                   }
                   if (o == push_outcome::disconnected) {
                       return done(404, "target disconnected");
                   }
                   done(status_code(o), why);
               });
    return true;
}

void node_impl::send_d2d(io_thread& home, d2d_message m, d2d_done done) {
    if (auto target = table_.find(m.to)) {
        if (m.to == m.from || same_account(m.account, target->account())) {
            deliver_d2d(home, m, std::move(done));
            return;
        }
        if (!fleet_) return done(403, "target belongs to another account");
        // Another account: only with the sender's allow-list.
        fleet_->allowed(
            home, m.from, m.to,
            [this, &home, m, done = std::move(done)](int verdict) mutable {
                if (verdict < 0) return done(503, "registry unavailable");
                if (verdict == 0) {
                    return done(403, "target belongs to another account");
                }
                if (!deliver_d2d(home, m, done)) {
                    done(404, "target is not connected");
                }
            });
        return;
    }
    if (!fleet_) return done(404, "target is not connected");
    counters::bump(home.stats.d2d_forwarded);
    fleet_->d2d(home, std::move(m), std::move(done));
}

node_impl::~node_impl() {
    stop();
    if (drain_watcher_.joinable()) drain_watcher_.join();
    release();
}

// Frees what start() made, in dependency order: everything bound to an
// io_context (the fleet's timers and sockets, the listeners) before the
// io_contexts themselves. Sessions left (only if stop timed out) die with
// their io_contexts.
void node_impl::release() noexcept {
    fleet_.reset();
    table_.clear();
    devices_.reset();
    pushes_.reset();
    threads_.clear();
}

// Each device takes a file descriptor, so the open-file limit caps them:
// the node keeps 64 for its own sockets (listeners, Redis, peer links,
// epoll) and room for the upgrades in progress, and refuses devices
// beyond the rest with 503 rather than fail to accept them. A configured
// max_pending_upgrades is held to a quarter of the limit, so the upgrades
// in progress (a refused one too, until its 503 is out) fit in that room.
void node_impl::set_connection_limit() {
    rlimit rl{};
    std::size_t files = SIZE_MAX;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY) {
        files = static_cast<std::size_t>(rl.rlim_cur);
    }
    std::size_t quarter = std::max<std::size_t>(files / 4, 1);
    pending_limit_ = cfg_.max_pending_upgrades
                         ? std::min<std::size_t>(cfg_.max_pending_upgrades, quarter)
                         : 0;
    std::size_t keep =
        64 + (pending_limit_ ? pending_limit_ : std::min<std::size_t>(1024, quarter));
    std::size_t budget = files > 2 * keep ? files - keep : files / 2;
    max_connections_ = cfg_.max_connections ? cfg_.max_connections : budget;
    if (cfg_.max_connections > budget) {
        PUSHY_WARN("max_connections {} is above what the open-file limit ({}) "
                   "leaves for devices ({}): raise it (ulimit -n) or devices "
                   "beyond it are closed unanswered",
                   cfg_.max_connections, files, budget);
    }
}

io_thread& node_impl::next_thread() noexcept {
    auto i = rr_.fetch_add(1, std::memory_order_relaxed);
    return *threads_[i % threads_.size()];
}

io_thread& node_impl::thread_of(net::io_context& ioc) noexcept {
    for (auto& t : threads_) {
        if (&t->ioc == &ioc) return *t;
    }
    return *threads_[0];
}

void node_impl::start() {
    if (running_) return;
    // A drain of an earlier run has stopped that run; its watcher is done.
    if (drain_watcher_.joinable()) drain_watcher_.join();
    draining_ = false;
    cfg_.validate();
    bool hs = cfg_.algorithm.starts_with("HS");
    verifier_ = std::make_unique<auth::jwt_verifier>(
        cfg_.algorithm, hs ? cfg_.secret : cfg_.public_key, cfg_.audience);
    node_id_ = cfg_.node_id.empty() ? random_node_id() : cfg_.node_id;
    tls_.reset();
    if (!cfg_.tls_cert.empty()) {
        tls_ = std::make_unique<tls::context>(cfg_.tls_cert, cfg_.tls_key);
    }
    set_connection_limit();

    unsigned n = cfg_.threads;
    if (n == 0) n = std::max(1u, std::thread::hardware_concurrency());
    threads_.clear();
    for (unsigned i = 0; i < n; ++i) {
        threads_.push_back(std::make_unique<io_thread>());
        threads_.back()->index = i;
        threads_.back()->thread_count = n;
    }
    auto& io0 = threads_[0]->ioc;
    try {
        devices_ = std::make_unique<device_server>(
            io0, cfg_.host, cfg_.port, "device port", cfg_.reuse_port);
        pushes_ = std::make_unique<push_server>(io0, cfg_.push_host,
                                                cfg_.push_port, "push port",
                                                false);
        port_ = devices_->port();
        push_port_ = pushes_->port();
        if (!cfg_.redis.empty()) {
            fleet_ = std::make_unique<pushy::fleet>(*this, *threads_[0]);
            fleet_->bind();
        }
    } catch (...) {
        // A port in use, a bad Redis URL or refused AUTH: nothing runs yet.
        release();
        throw;
    }

    auto pick = [this]() -> net::io_context& { return next_thread().ioc; };
    devices_->limit(&pending_upgrades, pending_limit_);
    devices_->count_into(&threads_[0]->stats);
    pushes_->count_into(&threads_[0]->stats);
    devices_->start(pick, [this](net::ip::tcp::socket s) {
        auto& t = thread_of(static_cast<net::io_context&>(
            s.get_executor().context()));
        start_upgrade(*this, t, std::move(s));
    });
    pushes_->start(pick, [this](net::ip::tcp::socket s) {
        auto& t = thread_of(static_cast<net::io_context&>(
            s.get_executor().context()));
        start_http_session(*this, t, std::move(s));
    });

    started_at_ = std::chrono::steady_clock::now();
    stopping_ = false;
    for (auto& t : threads_) {
        t->start_ticker();
        t->thread = std::thread([io = t.get()] {
            try {
                io->ioc.run();
            } catch (const std::exception& e) {
                PUSHY_ERROR("io thread {} failed: {}", io->index, e.what());
            }
        });
    }
    running_ = true;
    if (fleet_) fleet_->start();
    PUSHY_INFO("node {} listening: devices {}://{}:{}/v1/connect, push "
               "http://{}:{} ({} io thread{}){}",
               node_id_, tls_ ? "wss" : "ws", cfg_.host, port_,
               cfg_.push_host, push_port_, n,
               n == 1 ? "" : "s",
               fleet_ ? ", peer " + fleet_->peer_address() : std::string());
}

void node_impl::stop() {
    std::lock_guard lock(stop_mutex_);
    if (!running_) return;
    stopping_ = true;

    // Stop accepting, then ask every device to go away (1001).
    std::promise<void> stopped;
    net::post(threads_[0]->ioc, [this, &stopped] {
        devices_->stop();
        pushes_->stop();
        stopped.set_value();
    });
    stopped.get_future().wait();
    for (auto& s : table_.snapshot()) {
        net::post(s->context(), [s] {
            s->close(ws::close_going_away, "node shutting down");
        });
    }

    // Wait for the closing handshakes, bounded by the close timeout.
    auto deadline = std::chrono::steady_clock::now() +
                    std::chrono::duration_cast<std::chrono::nanoseconds>(
                        std::chrono::duration<double>(cfg_.close_timeout_s)) +
                    std::chrono::milliseconds(50);
    while ((live_sessions.load() != 0 || pending_upgrades.load() != 0) &&
           std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    if (fleet_) fleet_->stop();
    for (auto& t : threads_) t->ioc.stop();
    for (auto& t : threads_) {
        if (t->thread.joinable()) t->thread.join();
    }
    fleet_.reset();
    running_ = false;
    PUSHY_INFO("node {} stopped", node_id_);
}

bool node_impl::drain(double over_s) {
    if (!running_ || stopping_) return false;
    if (draining_.exchange(true)) return false;
    // Stop listening: with a shared port (SO_REUSEPORT) the kernel sends
    // every new connection, the reconnects included, to the other nodes;
    // behind a balancer, the refused connection moves it on. Upgrades
    // already accepted are refused with 503 (draining).
    net::post(threads_[0]->ioc, [this] { devices_->stop(); });
    auto sessions = table_.snapshot();
    auto now = std::chrono::steady_clock::now();
    {
        std::lock_guard lock(drain_mutex_);
        drain_started_ = now;
        drain_over_s_ = over_s;
        drain_devices_ = sessions.size();
    }
    PUSHY_INFO("node {} draining: {} device{} asked to reconnect over {}s",
               node_id_, sessions.size(), sessions.size() == 1 ? "" : "s",
               over_s);
    // Evenly spread: device k of N leaves at k * over_s / N.
    auto span = std::chrono::duration<double>(over_s);
    for (std::size_t k = 0; k < sessions.size(); ++k) {
        auto at = now + std::chrono::duration_cast<
                            std::chrono::steady_clock::duration>(
                            span * (static_cast<double>(k) /
                                    static_cast<double>(sessions.size())));
        auto& s = sessions[k];
        net::post(s->context(), [s, at] { s->drain_at(at); });
    }
    drain_watcher_ = std::thread([this] { watch_drain(); });
    return true;
}

void node_impl::watch_drain() {
    std::chrono::steady_clock::time_point deadline;
    {
        std::lock_guard lock(drain_mutex_);
        deadline = drain_started_ +
                   std::chrono::duration_cast<
                       std::chrono::steady_clock::duration>(
                       std::chrono::duration<double>(
                           drain_over_s_ + cfg_.reconnect_grace_s));
    }
    while (running_ && !stopping_) {
        bool empty = table_.size() == 0 && pending_upgrades.load() == 0;
        if (empty || std::chrono::steady_clock::now() >= deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    if (!running_) return;
    PUSHY_INFO("node {} drained ({} device{} left); stopping", node_id_,
               table_.size(), table_.size() == 1 ? "" : "s");
    stop();
}

std::string node_impl::drain_json() const {
    // Every field is always there (autoscalers read them without checks).
    if (!draining_) {
        return R"({"draining":false,"over_s":0,"elapsed_s":0,"deadline_s":0,)"
               R"("devices":0,"left":0})";
    }
    std::lock_guard lock(drain_mutex_);
    double elapsed = std::chrono::duration<double>(
                         std::chrono::steady_clock::now() - drain_started_)
                         .count();
    std::string s = R"({"draining":true,"over_s":)";
    json::append_number(s, drain_over_s_);
    s += ",\"elapsed_s\":";
    json::append_number(s, elapsed);
    s += ",\"deadline_s\":";
    json::append_number(s, drain_over_s_ + cfg_.reconnect_grace_s);
    s += ",\"devices\":" + std::to_string(drain_devices_);
    s += ",\"left\":" + std::to_string(table_.size());
    s += '}';
    return s;
}

std::string node_impl::stats_json() const {
    std::vector<const counters*> blocks;
    for (auto& t : threads_) blocks.push_back(&t->stats);
    double up = running_ ? std::chrono::duration<double>(
                               std::chrono::steady_clock::now() - started_at_)
                               .count()
                         : 0;
    auto s = pushy::stats_json(node_id_, table_.size(), blocks, up);
    s.pop_back();  // the closing brace
    s += ",\"upgrades_in_progress\":" +
         std::to_string(pending_upgrades.load(std::memory_order_relaxed));
    s += ",\"drain\":" + drain_json();
    if (fleet_) s += ",\"fleet\":" + fleet_->stats_json();
    s += '}';
    return s;
}

// ------------------------------------------------------------ public face

node::node(node_config cfg)
    : impl_(std::make_unique<node_impl>(std::move(cfg))) {}
node::~node() = default;
void node::start() { impl_->start(); }
void node::stop() { impl_->stop(); }
bool node::drain(double over_s) { return impl_->drain(over_s); }
bool node::draining() const noexcept { return impl_->draining(); }
bool node::running() const noexcept { return impl_->running(); }
std::uint16_t node::port() const noexcept { return impl_->port(); }
std::uint16_t node::push_port() const noexcept { return impl_->push_port(); }
std::uint16_t node::peer_port() const noexcept { return impl_->peer_port(); }
const std::string& node::node_id() const noexcept { return impl_->node_id(); }
std::size_t node::connections() const noexcept {
    return impl_->table().size();
}
std::string node::stats_json() const { return impl_->stats_json(); }

}  // namespace pushy
