#include "routing/fleet.hpp"

#include <optional>

#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include <atomic>
#include <unordered_map>
#include <future>
#include <thread>
#include <vector>

#include "core/logging.hpp"
#include "core/node_impl.hpp"
#include "detail/single_flight.hpp"
#include "detail/json_out.hpp"
#include "net/acceptor.hpp"
#include "net/session.hpp"
#include "registry/redis_client.hpp"
#include "registry/registry.hpp"
#include "routing/router.hpp"

namespace pushy {

namespace net = boost::asio;
using boost::system::error_code;
using tcp = net::ip::tcp;
using std::chrono::milliseconds;

namespace {

std::uint64_t load(const std::atomic<std::uint64_t>& a) {
    return a.load(std::memory_order_relaxed);
}

void bump(std::atomic<std::uint64_t>& a) {
    a.fetch_add(1, std::memory_order_relaxed);
}

// Wraps `done` so that it runs on `caller`, wherever it is called.
d2d_done on_thread(io_thread& caller, d2d_done done) {
    return [&caller, done = std::move(done)](int code, std::string_view why) {
        net::post(caller.ioc, [code, why = std::string(why), done] {
            done(code, why);
        });
    };
}

// The fields every entry a connection writes carries, taken on the
// session's thread when it happened: device, account, connection number
// and time (ms since the epoch), as stream field values.
struct entry_source {
    std::string device;
    std::string account;
    std::string conn;
    std::string time;
};

entry_source source_of(const session& s) {
    return {s.device(), s.account(), std::to_string(s.id()),
            std::to_string(peer::wall_ms())};
}

}  // namespace

struct fleet::impl {
    impl(node_impl& n, io_thread& h)
        : node(n), home(h), peers(h.ioc, n.config().peer_host,
                                   n.config().peer_port, "peer port", false),
          refresh_timer(h.ioc) {}

    node_impl& node;
    io_thread& home;
    redis::url url;
    std::unique_ptr<redis::client> redis;
    std::unique_ptr<registry::store> store;
    std::unique_ptr<routing::router> router;
    acceptor peers;
    net::steady_timer refresh_timer;
    milliseconds ttl{30000};
    bool reachable = false;

    // Counters, written on the home thread (peer ones on any thread).
    std::atomic<std::uint64_t> registered{0};
    std::atomic<std::uint64_t> unregistered{0};
    std::atomic<std::uint64_t> refreshed{0};
    std::atomic<std::uint64_t> reregistered{0};
    std::atomic<std::uint64_t> registry_errors{0};
    std::atomic<std::uint64_t> superseded_elsewhere{0};
    std::atomic<std::uint64_t> kicks_sent{0};
    std::atomic<std::uint64_t> kicks_received{0};
    std::atomic<std::uint64_t> forwarded{0};
    std::atomic<std::uint64_t> forward_failed{0};
    std::atomic<std::uint64_t> peer_pushes{0};
    std::atomic<std::uint64_t> peer_late{0};
    std::atomic<bool> redis_up{false};
    std::atomic<std::uint64_t> auth_hits{0};
    std::atomic<std::uint64_t> auth_misses{0};
    std::atomic<std::uint64_t> auth_store_calls{0};
    std::atomic<std::uint64_t> events_written{0};
    std::atomic<std::uint64_t> events_dropped{0};
    std::atomic<std::uint64_t> events_sent{0};

    // events_maxlen as XADD's MAXLEN argument; "0": no events, and service
    // streams are not trimmed.
    std::string maxlen = std::to_string(node.config().events_maxlen);
    std::string events_key = node.config().redis_prefix + "events";

    // Appends an entry of `fields` (names and values) to stream `key`,
    // trimmed to about events_maxlen entries (the `~`: Redis trims whole
    // nodes only, which is cheap). done(true) once Redis has it; false
    // without a reply or with an error. Home thread.
    void xadd(const std::string& key, std::vector<std::string_view> fields,
              std::function<void(bool)> done) {
        std::vector<std::string_view> argv{"XADD", key};
        if (maxlen != "0") argv.insert(argv.end(), {"MAXLEN", "~", maxlen});
        argv.push_back("*");
        argv.insert(argv.end(), fields.begin(), fields.end());
        redis->command(argv, [done = std::move(done)](redisReply* r) {
            done(r && !redis::reply_is_error(r));
        });
    }

    // Appends a connection event of `kind` from `src` to the events
    // stream, with one more field (`meta` or `topic`) when `extra_name` is
    // not empty; counted written or dropped. Without events
    // (events_maxlen 0) it writes nothing and answers false. done(ok) on
    // the home thread. Entries of one connection are sent from here in
    // the order they happened, and Redis applies them in that order.
    void add_event(std::string_view kind, const entry_source& src,
                   std::string_view extra_name, std::string_view extra_value,
                   std::function<void(bool)> done = {}) {
        if (maxlen == "0") {
            if (done) done(false);
            return;
        }
        std::vector<std::string_view> fields{
            "kind", kind,     "device", src.device, "account", src.account,
            "node", node.node_id(), "conn", src.conn, "time", src.time};
        if (!extra_name.empty()) {
            fields.insert(fields.end(), {extra_name, extra_value});
        }
        xadd(events_key, std::move(fields),
             [this, done = std::move(done)](bool ok) {
                 bump(ok ? events_written : events_dropped);
                 if (done) done(ok);
             });
    }

    // (sender, target) -> allowed, for targets of another account. Home
    // thread only.
    struct verdict {
        bool allowed;
        std::chrono::steady_clock::time_point expires;
    };
    std::unordered_map<std::string, verdict> allow_cache;
    detail::single_flight<std::function<void(int)>> allow_waiting;

    // Looks the sender's allow-list up (cached); done(1/0/-1) on home.
    void check_allowed(const std::string& sender, const std::string& target,
                       std::function<void(int)> done) {
        auto key = sender + '\n' + target;
        auto now = std::chrono::steady_clock::now();
        // Behind a check in flight, so the messages keep their order.
        if (allow_waiting.join(key, done)) return;
        if (auto it = allow_cache.find(key);
            it != allow_cache.end() && it->second.expires > now) {
            bump(auth_hits);
            return done(it->second.allowed ? 1 : 0);
        }
        bump(auth_misses);
        bump(auth_store_calls);
        allow_waiting.start(key, std::move(done));
        auto set = node.config().redis_prefix + "allow:{" + sender + "}";
        redis->command(
            {"SISMEMBER", set, target}, [this, key](redisReply* r) {
                auto waiting = allow_waiting.finish(key);
                auto done = [&waiting](int v) {
                    for (auto& w : waiting) w(v);
                };
                auto it = allow_cache.find(key);
                if (!r || redis::reply_is_error(r)) {
                    // Redis cannot answer: an older verdict still holds.
                    if (it != allow_cache.end()) {
                        return done(it->second.allowed ? 1 : 0);
                    }
                    return done(-1);
                }
                bool yes = redis::reply_integer(r) == 1;
                if (it == allow_cache.end() && allow_cache.size() >= 100000) {
                    allow_cache.erase(allow_cache.begin());
                }
                // A refusal is kept briefly, so an entry added to the
                // allow-list counts within a second.
                auto ttl = yes ? milliseconds(static_cast<long>(
                                     node.config().route_cache_ttl_s * 1000))
                               : milliseconds(1000);
                allow_cache[key] =
                    verdict{yes, std::chrono::steady_clock::now() + ttl};
                done(yes ? 1 : 0);
            });
    }

    registry::record record_of(const session& s, const std::string& addr) {
        registry::record r;
        r.node = node.node_id();
        r.peer = addr;
        r.conn = s.id();
        r.connected_at = s.connected_at();
        r.account = s.account();
        return r;
    }

    // A refresh round: the devices connected when it began, refreshed in
    // slices of `refresh_slice`, the next slice sent once the last one is
    // answered. Redis gets the round's commands a slice at a time, so the
    // node never holds a whole round's requests and callbacks at once
    // (the allocator would keep that memory), and upgrades' registry
    // writes never wait behind a round.
    struct refresh_round {
        std::vector<std::weak_ptr<session>> devices;
        std::size_t next = 0;
        std::size_t pending = 0;
        std::uint64_t generation = 0;
    };
    static constexpr std::size_t refresh_slice = 256;
    std::uint64_t refresh_generation = 0;

    // Extends (or writes again) the record of every connected device, and
    // the node's directory entry. Runs every third of the TTL and whenever
    // the Redis link comes back; a new round ends any older one.
    void refresh_all(const std::string& addr) {
        if (!redis->up()) return;
        store->put_node(node.node_id(), addr, ttl);
        auto round = std::make_shared<refresh_round>();
        round->generation = ++refresh_generation;
        auto all = node.table().snapshot();
        round->devices.assign(all.begin(), all.end());
        all = {};
        refresh_next(round, addr);
    }

    // Sends the next slice of `round`, if it is still the current round.
    void refresh_next(const std::shared_ptr<refresh_round>& round,
                      const std::string& addr) {
        if (round->generation != refresh_generation || !redis->up()) return;
        auto end = std::min(round->devices.size(), round->next + refresh_slice);
        for (; round->next < end; ++round->next) {
            auto s = round->devices[round->next].lock();
            if (!s) continue;
            ++round->pending;
            refresh_one(s, addr, [this, round, addr] {
                if (--round->pending == 0) refresh_next(round, addr);
            });
        }
        if (round->pending == 0 && round->next < round->devices.size()) {
            // Every device of the slice was gone: go on after other work.
            net::post(home.ioc, [this, round, addr] { refresh_next(round, addr); });
        }
    }

    // Refreshes the record of session `s`; `answered` runs after its
    // outcome was handled.
    template <class Done>
    void refresh_one(const std::shared_ptr<session>& s, const std::string& addr,
                     Done answered) {
        auto rec = record_of(*s, addr);
        store->refresh(s->device(), rec, ttl,
                       [this, s, answered = std::move(answered)](
                           int result, std::optional<registry::record> old) {
                           on_refreshed(s, result, old);
                           answered();
                       });
    }

    void on_refreshed(const std::shared_ptr<session>& s, int result,
                      const std::optional<registry::record>& old) {
        if (result == 1) return bump(refreshed);
        if (result == 2) return bump(reregistered);
        if (result < 0) return bump(registry_errors);
        if (result == 3) {
            bump(reregistered);
            if (old && old->node != node.node_id()) {
                bump(kicks_sent);
                router->kick(old->peer, s->device(), old->conn);
            }
            return;
        }
        // Another connection, on another node, owns the device now.
        bump(superseded_elsewhere);
        net::post(s->context(), [s] {
            s->close(ws::close_superseded, "superseded by a newer connection");
        });
    }

    void schedule_refresh(const std::string& addr) {
        refresh_timer.expires_after(ttl / 3);
        refresh_timer.async_wait([this, addr](error_code ec) {
            if (ec) return;
            refresh_all(addr);
            schedule_refresh(addr);
        });
    }
};

// --------------------------------------------------- peer-link server side

namespace {

// One incoming peer link: requests in, replies out, on one io thread.
class peer_conn : public std::enable_shared_from_this<peer_conn> {
public:
    peer_conn(node_impl& node, io_thread& thread, fleet::impl& f,
              tcp::socket s)
        : node_(node), thread_(thread), fleet_(f), socket_(std::move(s)) {}

    void run() {
        error_code ec;
        socket_.set_option(tcp::no_delay(true), ec);
        socket_.non_blocking(true, ec);
        do_read();
    }

private:
    // Waits for readability, then reads into the io thread's shared buffer
    // and consumes it at once. An async_read_some into that buffer would
    // let the sessions of this thread overwrite it between the read and
    // its handler.
    void do_read() {
        socket_.async_wait(tcp::socket::wait_read,
                           [self = shared_from_this()](error_code ec) {
                               self->on_readable(ec);
                           });
    }

    void on_readable(error_code ec) {
        if (ec) return close();
        auto& buf = thread_.read_buffer;
        for (;;) {
            std::size_t n = socket_.read_some(net::buffer(buf), ec);
            if (ec == net::error::would_block || ec == net::error::try_again) {
                return do_read();
            }
            if (ec) return close();
            if (!consume(buf.data(), n)) return;
            if (n < buf.size()) return do_read();
        }
    }

    // Feeds `n` bytes to the frame reader and handles every whole request;
    // false when the link was closed for a bad frame.
    bool consume(const char* data, std::size_t n) {
        reader_.feed(data, n);
        peer::request req;
        peer::reply rep;
        for (;;) {
            auto got = reader_.next(req, rep);
            if (got == peer::frame_reader::result::none) break;
            if (got != peer::frame_reader::result::request) {
                PUSHY_WARN("peer link: {}; closing",
                           got == peer::frame_reader::result::error
                               ? reader_.error_text()
                               : "a reply where a request was expected");
                close();
                return false;
            }
            handle(std::move(req));
            req = {};
        }
        return true;
    }

    void handle(peer::request req) {
        if (req.what == peer::kind::kick) {
            bump(fleet_.kicks_received);
            auto id_of = [](const session& s) { return s.id(); };
            if (auto s = node_.table().supersede(req.device, req.conn, id_of)) {
                net::post(s->context(), [s] {
                    s->close(ws::close_superseded,
                             "superseded by a newer connection");
                });
            }
            peer::reply r;
            r.id = req.id;
            r.code = 200;
            r.status = "ok";
            r.node = node_.node_id();
            return send(r);
        }
        // Time left before the sender gives up; none left: not delivered.
        std::optional<milliseconds> left;
        if (req.deadline_ms != 0) {
            auto now = peer::wall_ms();
            if (now >= req.deadline_ms) return too_late(req);
            left = milliseconds(req.deadline_ms - now);
        }
        if (req.what == peer::kind::d2d) {
            return handle_d2d(std::move(req), left);
        }
        if (req.what == peer::kind::event) {
            return handle_event(std::move(req), left);
        }
        bump(fleet_.peer_pushes);
        if (req.data.size() > node_.config().max_push_bytes) {
            thread_.stats.count(push_outcome::too_large);
            return answer(req.id, push_outcome::too_large,
                          "'data' is larger than " +
                              std::to_string(node_.config().max_push_bytes) +
                              " bytes");
        }
        auto id = req.id;
        bool here = node_.deliver_local(
            thread_, req.device, req.data, req.from, req.want_ack,
            timeout_of(req, left),
            [self = shared_from_this(), id](push_outcome o,
                                            std::uint64_t push_id,
                                            std::string_view reason) {
                peer::reply r;
                r.id = id;
                r.code = static_cast<std::uint16_t>(status_code(o));
                r.status = std::string(status_name(o));
                r.node = self->node_.node_id();
                r.push_id = push_id;
                r.reason = std::string(reason);
                self->thread_.stats.count(o);
                self->send(r);
            },
            req.msg_id);
        if (!here) {
            thread_.stats.count(push_outcome::not_connected);
            answer(id, push_outcome::not_connected, "device is not connected");
        }
    }

    // How long a push or event may wait to be written (or acked): the
    // request's timeout (the node's push_timeout_s when 0), at most the
    // time `left` before the sender gives up.
    milliseconds timeout_of(const peer::request& req,
                            std::optional<milliseconds> left) const {
        auto timeout = milliseconds(
            req.timeout_ms ? req.timeout_ms
                           : static_cast<std::uint32_t>(
                                 node_.config().push_timeout_s * 1000));
        if (left && *left < timeout) timeout = *left;
        return timeout;
    }

    // An event frame for a device connected here (from the device-list
    // service, through a push client): written as it is once it proved a
    // JSON object with "t":"event", to connection `conn` only when that is
    // not 0. Answered like a push but not counted as one: events_sent
    // counts the frames written.
    void handle_event(peer::request req, std::optional<milliseconds> left) {
        if (!is_event_frame(req.data)) {
            return answer(req.id, push_outcome::bad_request,
                          "an event must be a JSON object with "
                          "\"t\":\"event\"");
        }
        auto id = req.id;
        auto where = node_.deliver_event(
            thread_, req.device, req.conn, std::move(req.data),
            timeout_of(req, left),
            [self = shared_from_this(), id](push_outcome o, std::uint64_t,
                                            std::string_view reason) {
                if (o == push_outcome::delivered) {
                    bump(self->fleet_.events_sent);
                }
                self->answer(id, o, std::string(reason));
            });
        if (where == node_impl::event_target::not_connected) {
            answer(id, push_outcome::not_connected, "device is not connected");
        } else if (where == node_impl::event_target::gone) {
            answer(id, push_outcome::not_connected, "connection is gone");
        }
    }

    // Whether `text` is a JSON object whose "t" is "event". The sender
    // checks it too; a node still never writes a device what is not a
    // frame of the protocol.
    bool is_event_frame(std::string_view text) {
        auto padded = thread_.padded(text);
        simdjson::dom::element doc;
        simdjson::dom::object obj;
        std::string_view t;
        return !thread_.dom.parse(padded.data(), padded.size(), false)
                    .get(doc) &&
               !doc.get_object().get(obj) && !obj["t"].get_string().get(t) &&
               t == "event";
    }

    // Answers a request that arrived after its deadline (this node was
    // stalled, or the link was slow): 504, and nothing is delivered.
    void too_late(const peer::request& req) {
        bump(fleet_.peer_late);
        if (req.what == peer::kind::push) {
            thread_.stats.count(push_outcome::timeout);
        }
        answer(req.id, push_outcome::timeout,
               "arrived after its deadline; not delivered");
    }

    // Answers request `id` with outcome `o` and `reason`, from this node.
    void answer(std::uint64_t id, push_outcome o, std::string reason) {
        peer::reply r;
        r.id = id;
        r.code = static_cast<std::uint16_t>(status_code(o));
        r.status = std::string(status_name(o));
        r.node = node_.node_id();
        r.reason = std::move(reason);
        send(r);
    }

    // A d2d message for a device connected here, already authorized by
    // the sender's node; `left` is the time before the sender gives up.
    void handle_d2d(peer::request req, std::optional<milliseconds> left) {
        d2d_message m;
        m.msg_id = std::move(req.msg_id);
        m.from = std::move(req.from);
        m.account = std::move(req.account);
        m.to = std::move(req.device);
        m.data = std::move(req.data);
        auto id = req.id;
        auto answer = [self = shared_from_this(), id](int code,
                                                     std::string_view why) {
            peer::reply r;
            r.id = id;
            r.code = static_cast<std::uint16_t>(code);
            r.status = code == 200 ? "delivered" : "failed";
            r.node = self->node_.node_id();
            r.reason = std::string(why);
            self->send(r);
        };
        if (!node_.deliver_d2d(thread_, m, answer, left)) {
            answer(404, "target is not connected");
        }
    }

    // Queues a reply; one write in flight, the rest coalesced behind it.
    void send(const peer::reply& r) {
        if (closed_) return;
        peer::encode(out_, r);
        flush();
    }

    void flush() {
        if (writing_ || out_.empty() || closed_) return;
        writing_ = true;
        inflight_.swap(out_);
        net::async_write(socket_, net::buffer(inflight_),
                         [self = shared_from_this()](error_code ec,
                                                     std::size_t) {
                             self->writing_ = false;
                             self->inflight_.clear();
                             if (ec) return self->close();
                             self->flush();
                         });
    }

    void close() {
        closed_ = true;
        error_code ec;
        socket_.close(ec);
    }

    node_impl& node_;
    io_thread& thread_;
    fleet::impl& fleet_;
    tcp::socket socket_;
    peer::frame_reader reader_;
    std::string out_;
    std::string inflight_;
    bool writing_ = false;
    bool closed_ = false;
};

}  // namespace

// ------------------------------------------------------------------ fleet

fleet::fleet(node_impl& node, io_thread& home)
    : impl_(std::make_unique<impl>(node, home)) {}

fleet::~fleet() = default;

std::uint16_t fleet::peer_port() const noexcept { return impl_->peers.port(); }

void fleet::bind() {
    auto& f = *impl_;
    const auto& cfg = f.node.config();
    f.url = redis::parse_url(cfg.redis);
    f.ttl = milliseconds(static_cast<long>(cfg.registry_ttl_s * 1000));
    std::string why;
    f.reachable = redis::probe(f.url, milliseconds(2000), why);
    if (!f.reachable) {
        PUSHY_WARN("redis at {} is not reachable ({}); devices connect, "
                   "pushes to other nodes answer 503 until it is",
                   f.url.display(), why);
    }
    address_ = cfg.peer_host + ":" + std::to_string(f.peers.port());
    // Made before any io thread runs: sessions and pushes use them at once.
    f.redis = std::make_unique<redis::client>(f.home.ioc, f.url, "registry");
    f.store = std::make_unique<registry::store>(*f.redis, cfg.redis_prefix);
    f.router = std::make_unique<routing::router>(
        f.home.ioc, *f.store, f.node.node_id(),
        milliseconds(static_cast<long>(cfg.route_cache_ttl_s * 1000)));
}

void fleet::start() {
    auto& f = *impl_;
    auto addr = address_;
    f.redis->on_up([&f, addr] {
        f.redis_up = true;
        // Redis may have restarted empty: write every record again now.
        f.refresh_all(addr);
    });
    f.redis->on_down([&f] { f.redis_up = false; });
    net::post(f.home.ioc, [&f, addr] {
        f.redis->start();
        f.schedule_refresh(addr);
    });
    // Redis answered the probe: let the link come up before start()
    // returns, so the first pushes do not meet a registry still connecting.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (f.reachable && !f.redis->up() &&
           std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(milliseconds(1));
    }
    auto& node = f.node;
    f.peers.start([&node]() -> net::io_context& { return node.next_thread().ioc; },
                  [&f](tcp::socket s) {
                      auto& t = f.node.thread_of(static_cast<net::io_context&>(
                          s.get_executor().context()));
                      std::make_shared<peer_conn>(f.node, t, f, std::move(s))
                          ->run();
                  });
}

void fleet::stop() {
    auto& f = *impl_;
    auto done = std::make_shared<std::promise<void>>();
    net::post(f.home.ioc, [&f, done] {
        f.peers.stop();
        f.refresh_timer.cancel();
        if (!f.redis || !f.redis->up()) {
            if (f.router) f.router->stop();
            if (f.redis) f.redis->stop();
            return done->set_value();
        }
        f.store->remove_node(f.node.node_id());
        // Redis answers in order: once this PING answers, every earlier
        // command (the last records removed) has been applied.
        f.redis->command({"PING"}, [&f, done](redisReply*) {
            f.router->stop();
            f.redis->stop();
            done->set_value();
        });
    });
    done->get_future().wait_for(std::chrono::seconds(3));
}

void fleet::connected(const session& s, std::string meta,
                      std::function<void()> registered) {
    auto& f = *impl_;
    auto rec = f.record_of(s, address_);
    net::post(f.home.ioc, [&f, src = source_of(s), rec = std::move(rec),
                           meta = std::move(meta),
                           registered = std::move(registered)]() mutable {
        if (!f.store) return registered();
        auto device = src.device;  // not src.device: src moves below
        f.store->put(device, rec, f.ttl,
                     [&f, src = std::move(src), meta = std::move(meta),
                      self = rec.node, registered = std::move(registered)](
                         registry::found found, registry::record old) {
                         // Sent here, after the record is written (even
                         // when the put had to load its script again), and
                         // before the session starts: its later entries
                         // follow this one.
                         f.add_event("connected", src, "meta",
                                     meta.empty() ? "{}" : meta);
                         registered();
                         if (found == registry::found::unavailable) {
                             // Written again when Redis returns.
                             return bump(f.registry_errors);
                         }
                         bump(f.registered);
                         if (found == registry::found::yes &&
                             old.node != self) {
                             // The device was connected to another node:
                             // that connection is the older one.
                             bump(f.kicks_sent);
                             f.router->kick(old.peer, src.device, old.conn);
                         }
                     });
    });
}

void fleet::disconnected(const session& s, bool owner) {
    auto& f = *impl_;
    auto rec = f.record_of(s, address_);
    net::post(f.home.ioc, [&f, src = source_of(s), rec = std::move(rec),
                           owner] {
        if (!f.store) return;
        if (owner) {
            bump(f.unregistered);
            f.store->remove(src.device, rec);
        }
        f.add_event("disconnected", src, {}, {});
    });
}

void fleet::send_upstream(io_thread& caller, const session& s,
                          upstream_message m, d2d_done done) {
    auto& f = *impl_;
    net::post(f.home.ioc, [&f, src = source_of(s), m = std::move(m),
                           answer = on_thread(caller, std::move(done))] {
        auto key = f.node.config().redis_prefix + "svc:" + m.service;
        f.xadd(key,
               {"id", m.msg_id, "from", src.device, "account", src.account,
                "node", f.node.node_id(), "conn", src.conn, "time", src.time,
                "data", m.data},
               [answer](bool ok) {
                   if (ok) return answer(202, {});
                   answer(503, "registry unavailable");
               });
    });
}

void fleet::subscription(io_thread& caller, const session& s,
                         std::string_view kind, std::string_view topic,
                         d2d_done done) {
    auto& f = *impl_;
    net::post(f.home.ioc, [&f, src = source_of(s), kind = std::string(kind),
                           topic = std::string(topic),
                           answer = on_thread(caller, std::move(done))] {
        f.add_event(kind, src, "topic", topic, [answer](bool ok) {
            if (ok) return answer(202, {});
            answer(503, "registry unavailable");
        });
    });
}

void fleet::push(io_thread& caller, peer::request req, milliseconds timeout,
                 std::function<void(peer::reply)> done) {
    auto& f = *impl_;
    net::post(f.home.ioc, [&f, &caller, req = std::move(req), timeout,
                           done = std::move(done)]() mutable {
        bump(f.forwarded);
        f.router->push(std::move(req), timeout,
                       [&f, &caller, done = std::move(done)](
                           const peer::reply& r) mutable {
                           if (r.code != 200) bump(f.forward_failed);
                           net::post(caller.ioc, [r, done = std::move(done)] {
                               done(r);
                           });
                       });
    });
}

void fleet::allowed(io_thread& caller, const std::string& sender,
                    const std::string& target, std::function<void(int)> done) {
    auto& f = *impl_;
    net::post(f.home.ioc, [&f, &caller, sender, target,
                           done = std::move(done)]() mutable {
        f.check_allowed(sender, target,
                        [&caller, done = std::move(done)](int v) mutable {
                            net::post(caller.ioc, [v, done = std::move(done)] {
                                done(v);
                            });
                        });
    });
}

void fleet::d2d(io_thread& caller, d2d_message m, d2d_done done) {
    auto& f = *impl_;
    // Every answer goes back to the sender's thread.
    auto answer = on_thread(caller, std::move(done));
    net::post(f.home.ioc, [&f, m = std::move(m), answer]() mutable {
        std::string to = m.to;  // not m.to: m moves into the handler
        f.router->resolve(to, [&f, m = std::move(m), answer](
                                    registry::found found,
                                    const routing::route& r) mutable {
            if (found == registry::found::unavailable) {
                return answer(503, "registry unavailable");
            }
            if (found == registry::found::no || r.node == f.node.node_id()) {
                return answer(404, "target is not connected");
            }
            auto forward = [&f, m, answer, r]() {
                peer::request req;
                req.what = peer::kind::d2d;
                req.device = m.to;
                req.data = m.data;
                req.from = m.from;
                req.account = m.account;
                req.msg_id = m.msg_id;
                auto timeout = milliseconds(static_cast<long>(
                    f.node.config().push_timeout_s * 1000 + 1000));
                f.router->send_via(r, std::move(req), timeout,
                                   [answer](const peer::reply& rep) {
                                       answer(rep.code, rep.reason);
                                   });
            };
            if (same_account(m.account, r.account)) return forward();
            f.check_allowed(m.from, m.to, [answer, forward](int v) {
                if (v < 0) return answer(503, "registry unavailable");
                if (v == 0) {
                    return answer(403, "target belongs to another account");
                }
                forward();
            });
        });
    });
}

std::string fleet::stats_json() const {
    auto& f = *impl_;
    std::string s = "{\"redis\":";
    s += f.redis_up.load() ? "\"up\"" : "\"down\"";
    s += ",\"peer\":";
    json::append_string(s, address_);
    auto field = [&](std::string_view name, std::uint64_t v) {
        s += ",\"";
        s += name;
        s += "\":";
        s += std::to_string(v);
    };
    field("registered", load(f.registered));
    field("unregistered", load(f.unregistered));
    field("refreshed", load(f.refreshed));
    field("reregistered", load(f.reregistered));
    field("registry_errors", load(f.registry_errors));
    field("superseded_elsewhere", load(f.superseded_elsewhere));
    field("kicks_sent", load(f.kicks_sent));
    field("kicks_received", load(f.kicks_received));
    field("forwarded", load(f.forwarded));
    field("forward_failed", load(f.forward_failed));
    field("peer_pushes", load(f.peer_pushes));
    field("peer_late", load(f.peer_late));
    field("route_cache_hits", f.router ? load(f.router->cache().hits) : 0);
    field("route_cache_misses",
          f.router ? load(f.router->cache().misses) : 0);
    field("auth_cache_hits", load(f.auth_hits));
    field("auth_cache_misses", load(f.auth_misses));
    field("events_written", load(f.events_written));
    field("events_dropped", load(f.events_dropped));
    field("events_sent", load(f.events_sent));
    field("store_calls",
          load(f.auth_store_calls) +
              (f.router ? load(f.router->resolve_lookups) : 0));
    s += '}';
    return s;
}

}  // namespace pushy
