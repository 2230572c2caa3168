#include "pushy/push_client.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <simdjson.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>

#include "core/logging.hpp"
#include "pushy/config.hpp"
#include "queue/queue.hpp"
#include "registry/redis_client.hpp"
#include "registry/registry.hpp"
#include "routing/router.hpp"

namespace pushy {

namespace net = boost::asio;
using clock = std::chrono::steady_clock;

namespace {

push_result local_result(int code, std::string status, std::string reason) {
    push_result r;
    r.code = code;
    r.status = std::move(status);
    r.reason = std::move(reason);
    return r;
}

// The result of a request answered by `rep`, sent at `started`.
push_result result_of(const peer::reply& rep, clock::time_point started) {
    push_result r;
    r.code = rep.code;
    r.status = rep.status;
    r.node = rep.node;
    r.id = rep.push_id;
    r.reason = rep.reason;
    r.latency_s =
        std::chrono::duration<double>(clock::now() - started).count();
    return r;
}

std::string check(const push_spec_in& s);

// Checks an event before it leaves: the device id (by the rules of a
// push) and that the frame is a JSON object whose "t" is "event". Returns
// the reason, or empty.
std::string check_event(const std::string& device, const std::string& frame) {
    push_spec_in spec;
    spec.device = device;
    spec.data = "0";
    if (auto why = check(spec); !why.empty()) return why;
    thread_local simdjson::dom::parser parser;
    simdjson::padded_string padded(frame);
    simdjson::dom::element doc;
    simdjson::dom::object obj;
    std::string_view t;
    if (parser.parse(padded).get(doc) || doc.get_object().get(obj) ||
        obj["t"].get_string().get(t) || t != "event") {
        return "an event must be a JSON object with \"t\":\"event\"";
    }
    if (frame.size() > (8u << 20)) return "the event is larger than 8 MiB";
    return {};
}

// Checks a push before it leaves: the device id and that `data` is JSON
// (a node passes it to the device as it is). Returns the reason, or empty.
std::string check(const push_spec_in& s) {
    if (s.device.empty()) return "'device' must not be empty";
    if (s.device.size() > max_device_bytes) {
        return "'device' is longer than 256 bytes";
    }
    thread_local simdjson::dom::parser parser;
    simdjson::padded_string padded(s.data);
    simdjson::dom::element ignored;
    if (parser.parse(padded).get(ignored)) return "'data' is not valid JSON";
    // The node holds data to its max_push_bytes (413); this bound keeps a
    // frame well inside what a peer link carries.
    if (s.data.size() > (8u << 20)) return "'data' is larger than 8 MiB";
    if (!(s.timeout_s >= 0) || s.timeout_s > 3600) {
        return "'timeout' must be between 0 and 3600 seconds";
    }
    return {};
}

// Checks a message before it is queued. Returns the reason, or empty.
std::string check(const enqueue_spec& s) {
    push_spec_in p;
    p.device = s.device;
    p.data = s.data;
    if (auto why = check(p); !why.empty()) return why;
    if (s.id.size() > 256) return "'id' is longer than 256 bytes";
    if (!(s.ttl_s > 0) || s.ttl_s > 30 * 86400) {
        return "'ttl' must be more than 0 and at most 30 days";
    }
    if (s.shards < 1 || s.shards > 1024) {
        return "'shards' must be between 1 and 1024";
    }
    return {};
}

enqueue_result enqueue_answer(int code, std::string status, std::string id,
                              std::string reason) {
    enqueue_result r;
    r.code = code;
    r.status = std::move(status);
    r.id = std::move(id);
    r.reason = std::move(reason);
    return r;
}

}  // namespace

class push_client_impl {
public:
    push_client_impl(redis::url u, std::string prefix, double timeout_s)
        : redis_(ioc_, std::move(u), "push client"), prefix_(prefix),
          store_(redis_, std::move(prefix)), router_(ioc_, store_, {}),
          timeout_(std::chrono::milliseconds(
              static_cast<long>(timeout_s * 1000))) {
        net::post(ioc_, [this] { redis_.start(); });
        thread_ = std::thread([this] { ioc_.run(); });
    }

    ~push_client_impl() { close(); }

    void push_async(push_spec_in spec, std::function<void(push_result)> done) {
        auto started = clock::now();
        if (auto why = check(spec); !why.empty()) {
            auto r = local_result(400, "bad_request", why);
            return done(std::move(r));
        }
        if (closed_) {
            return done(local_result(503, "unavailable", "client is closed"));
        }
        peer::request req;
        req.device = std::move(spec.device);
        req.data = std::move(spec.data);
        req.want_ack = spec.want_ack;
        req.timeout_ms = static_cast<std::uint32_t>(spec.timeout_s * 1000);
        req.from = std::move(spec.from);
        // The node answers within the ack timeout (its own default when
        // none is given); the link waits that plus the client's margin.
        auto timeout = timeout_ + std::chrono::milliseconds(req.timeout_ms);
        net::post(ioc_, [this, req = std::move(req), timeout, started,
                         done = std::move(done)]() mutable {
            if (closed_) {
                return done(local_result(503, "unavailable",
                                         "client is closed"));
            }
            router_.push(std::move(req), timeout,
                         [this, started, done = std::move(done)](
                             const peer::reply& rep) {
                             hits_ = router_.cache().hits.load();
                             misses_ = router_.cache().misses.load();
                             done(result_of(rep, started));
                         });
        });
    }

    void enqueue_async(enqueue_spec spec,
                       std::function<void(enqueue_result)> done) {
        if (spec.id.empty()) spec.id = queue::random_id();
        if (auto why = check(spec); !why.empty()) {
            return done(enqueue_answer(400, "bad_request", spec.id, why));
        }
        if (closed_) {
            return done(enqueue_answer(503, "unavailable", spec.id,
                                       "client is closed"));
        }
        queue::message m;
        m.id = std::move(spec.id);
        m.device = std::move(spec.device);
        m.data = std::move(spec.data);
        m.want_ack = spec.want_ack;
        m.enqueued_ms = peer::wall_ms();
        m.expires_ms = m.enqueued_ms +
                       static_cast<std::uint64_t>(spec.ttl_s * 1000);
        m.from = std::move(spec.from);
        auto key = queue::shard_key(prefix_, queue::shard_of(m.device,
                                                             spec.shards));
        net::post(ioc_, [this, m = std::move(m), key = std::move(key),
                         done = std::move(done)]() mutable {
            auto fields = queue::fields_of(m);
            std::vector<std::string_view> argv{"XADD", key, "*"};
            for (auto& f : fields) argv.push_back(f);
            redis_.command(argv, [id = std::move(m.id),
                                  done = std::move(done)](redisReply* r) {
                if (!r || redis::reply_is_error(r)) {
                    std::string why = r ? std::string(redis::reply_text(r))
                                        : "registry unavailable";
                    return done(enqueue_answer(503, "unavailable", id, why));
                }
                auto a = enqueue_answer(202, "accepted", id, {});
                a.entry = std::string(redis::reply_text(r));
                done(std::move(a));
            });
        });
    }

    void close() {
        if (closed_.exchange(true)) return;
        std::promise<void> stopped;
        net::post(ioc_, [this, &stopped] {
            router_.stop();
            redis_.stop();
            stopped.set_value();
        });
        stopped.get_future().wait();
        work_.reset();
        ioc_.stop();
        if (thread_.joinable()) thread_.join();
    }

    void send_event_async(std::string device, std::string frame,
                          std::uint64_t conn,
                          std::function<void(push_result)> done) {
        auto started = clock::now();
        if (auto why = check_event(device, frame); !why.empty()) {
            return done(local_result(400, "bad_request", why));
        }
        peer::request req;
        req.what = peer::kind::event;
        req.device = std::move(device);
        req.data = std::move(frame);
        req.conn = conn;
        net::post(ioc_, [this, req = std::move(req), started,
                         done = std::move(done)]() mutable {
            if (closed_) {
                return done(local_result(503, "unavailable",
                                         "client is closed"));
            }
            // The node writes within its push_timeout_s; the link waits
            // that plus the client's margin, as for a push.
            router_.push(std::move(req), timeout_,
                         [started, done = std::move(done)](
                             const peer::reply& rep) {
                             done(result_of(rep, started));
                         });
        });
    }

    bool connected() const { return redis_.up(); }
    std::uint64_t hits() const { return hits_; }
    std::uint64_t misses() const { return misses_; }

private:
    net::io_context ioc_{1};
    net::executor_work_guard<net::io_context::executor_type> work_ =
        net::make_work_guard(ioc_);
    redis::client redis_;
    std::string prefix_;
    registry::store store_;
    routing::router router_;
    std::chrono::milliseconds timeout_;
    std::thread thread_;
    std::atomic<bool> closed_{false};
    std::atomic<std::uint64_t> hits_{0};
    std::atomic<std::uint64_t> misses_{0};
};

push_client::push_client(const std::string& redis_url,
                         const std::string& prefix, double timeout_s) {
    auto u = redis::parse_url(redis_url);
    if (prefix.empty() || prefix.find_first_of(" \t\r\n{}") !=
                              std::string::npos) {
        throw config_error("prefix must be non-empty, without blanks or "
                           "braces");
    }
    if (!(timeout_s > 0) || timeout_s > 3600) {
        throw config_error("timeout must be between 0 and 3600 seconds");
    }
    std::string why;
    bool reachable = redis::probe(u, std::chrono::milliseconds(2000), why);
    if (!reachable) {
        PUSHY_WARN("push client: redis at {} is not reachable ({}); pushes "
                   "answer 503 until it is",
                   u.display(), why);
    }
    impl_ = std::make_unique<push_client_impl>(std::move(u), prefix,
                                               timeout_s);
    // The server answered the probe: let the link come up before the
    // first push, so it does not meet a registry still connecting.
    auto deadline = clock::now() + std::chrono::seconds(2);
    while (reachable && !impl_->connected() && clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
}

push_client::~push_client() = default;

namespace {

// Runs `start(done)` and blocks until `done` got the result.
template <class Result, class Start>
Result wait_for(Start start) {
    std::promise<Result> p;
    auto f = p.get_future();
    start([&p](Result r) { p.set_value(std::move(r)); });
    return f.get();
}

// Runs `start(spec, done)` for every spec at once and blocks until each
// result came; the results in the order of `specs`.
template <class Result, class Spec, class Start>
std::vector<Result> wait_for_all(std::vector<Spec> specs, Start start) {
    std::vector<Result> out(specs.size());
    std::vector<std::promise<void>> promises(specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
        start(std::move(specs[i]), [&out, &promises, i](Result r) {
            out[i] = std::move(r);
            promises[i].set_value();
        });
    }
    for (auto& p : promises) p.get_future().wait();
    return out;
}

}  // namespace

void push_client::send_event_async(std::string device, std::string frame_json,
                                   std::uint64_t conn,
                                   std::function<void(push_result)> done) {
    impl_->send_event_async(std::move(device), std::move(frame_json), conn,
                            std::move(done));
}

push_result push_client::send_event(std::string device, std::string frame_json,
                                    std::uint64_t conn) {
    return wait_for<push_result>([&](auto done) {
        impl_->send_event_async(std::move(device), std::move(frame_json), conn,
                                std::move(done));
    });
}

void push_client::push_async(push_spec_in spec,
                             std::function<void(push_result)> done) {
    impl_->push_async(std::move(spec), std::move(done));
}

push_result push_client::push(push_spec_in spec) {
    return wait_for<push_result>(
        [&](auto done) { impl_->push_async(std::move(spec), std::move(done)); });
}

std::vector<push_result> push_client::push_many(
    std::vector<push_spec_in> specs) {
    return wait_for_all<push_result>(std::move(specs), [this](auto s, auto d) {
        impl_->push_async(std::move(s), std::move(d));
    });
}

void push_client::enqueue_async(enqueue_spec spec,
                                std::function<void(enqueue_result)> done) {
    impl_->enqueue_async(std::move(spec), std::move(done));
}

enqueue_result push_client::enqueue(enqueue_spec spec) {
    return wait_for<enqueue_result>([&](auto done) {
        impl_->enqueue_async(std::move(spec), std::move(done));
    });
}

std::vector<enqueue_result> push_client::enqueue_many(
    std::vector<enqueue_spec> specs) {
    return wait_for_all<enqueue_result>(
        std::move(specs), [this](auto s, auto d) {
            impl_->enqueue_async(std::move(s), std::move(d));
        });
}

bool push_client::connected() const { return impl_->connected(); }
std::uint64_t push_client::cache_hits() const { return impl_->hits(); }
std::uint64_t push_client::cache_misses() const { return impl_->misses(); }
void push_client::close() { impl_->close(); }

}  // namespace pushy
