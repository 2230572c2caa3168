#include "net/session.hpp"

#include <boost/asio/post.hpp>

#include <algorithm>
#include <cctype>
#include <climits>
#include <cstdint>
#include <random>
#include <utility>

#include "core/logging.hpp"
#include "core/node_impl.hpp"
#include "detail/json_out.hpp"
#include "detail/json_raw.hpp"
#include "routing/fleet.hpp"

namespace pushy {

namespace net = boost::asio;
using boost::system::error_code;

// A push written to the device and waiting for its ack.
struct session::pending_ack : timer_entry {
    session* owner = nullptr;
    std::uint64_t id = 0;
    std::string msg_id;  // a queued message's id (acked by it), or empty
    push_done done;

    ~pending_ack() { timer_wheel::cancel(*this); }

    static void on_timer(timer_entry* e) {
        auto* a = static_cast<pending_ack*>(e);
        a->owner->settle_ack(a, push_outcome::timeout,
                             "device did not ack in time");
    }
};

namespace {

// A factor in [lo, 1) that spreads heartbeats and lifetimes so connections
// made together do not act together.
double jitter(double lo) {
    thread_local std::minstd_rand rng{std::random_device{}()};
    std::uniform_real_distribution<double> d(lo, 1.0);
    return d(rng);
}

session::clock::duration seconds(double s) {
    return std::chrono::duration_cast<session::clock::duration>(
        std::chrono::duration<double>(s));
}

}  // namespace

session::session(node_impl& node, io_thread& thread, tcp::socket socket,
                 auth::claims claims, tls::SSL* tls)
    : node_(node),
      thread_(thread),
      socket_(std::move(socket)),
      tls_(tls),
      reader_(node.config().max_message_bytes),
      device_(std::move(claims.device)),
      account_(std::move(claims.account)),
      id_(node.next_connection_id()),
      connected_at_(std::chrono::duration_cast<std::chrono::seconds>(
                        std::chrono::system_clock::now().time_since_epoch())
                        .count()) {
    fire = &session::on_timer;
    if (claims.expires_at > 0) {
        has_expiry_ = true;
        auto left = std::chrono::seconds(claims.expires_at - connected_at_);
        token_expiry_ = clock::now() + left;
    }
}

// The wheel entry and any pending acks are unlinked on the io thread by
// finish(); this only covers a session that never started.
session::~session() {
    timer_wheel::cancel(*this);
    tls::release(tls_);
}

net::io_context& session::context() noexcept { return thread_.ioc; }

void session::start(std::string_view leftover, std::string meta,
                    std::string response) {
    // The socket is non-blocking with TCP_NODELAY already (the upgrade).
    auto* f = node_.fleet();
    if (!f) return begin(leftover, response);
    // On a fleet the device is registered in Redis before it gets hello:
    // once a device has its hello, pushes from any node reach it. (When
    // Redis is down the answer comes at once and the record is written
    // when it returns.)
    f->connected(*this, std::move(meta),
                 [self = shared_from_this(), rest = std::string(leftover),
                  response = std::move(response)]() mutable {
        net::post(self->context(), [self, rest = std::move(rest),
                                    response = std::move(response)] {
            self->begin(rest, response);
        });
    });
}

void session::begin(std::string_view leftover, std::string_view response) {
    // Register, superseding any older connection of the device (RFC-free
    // rule of the product: exactly one live connection per device).
    bool kicked = false;
    auto old = node_.table().insert(device_, shared_from_this(), id_, &kicked);
    registered_ = true;
    started_ = true;
    node_.live_sessions.fetch_add(1, std::memory_order_relaxed);
    counters::bump(thread_.stats.connections_opened);
    if (old) {
        net::post(old->context(), [old] {
            old->close(ws::close_superseded,
                       "superseded by a newer connection");
        });
    }

    const auto& cfg = node_.config();
    auto now = clock::now();
    next_ping_ = now + seconds(cfg.heartbeat_s * jitter(0.8));
    auto lifetime = cfg.lifetime_s * jitter(0.9);
    lifetime_end_ = now + seconds(lifetime);
    // Started after a drain began (its snapshot missed it): leave at once.
    if (node_.draining()) drain_at(now);

    std::string hello;
    hello.reserve(128);
    hello += R"({"t":"hello","device":)";
    json::append_string(hello, device_);
    hello += R"(,"node":)";
    json::append_string(hello, node_.node_id());
    hello += R"(,"heartbeat_s":)";
    json::append_number(hello, cfg.heartbeat_s);
    hello += R"(,"reconnect_in_s":)";
    json::append_number(hello, static_cast<double>(
                                   static_cast<std::int64_t>(lifetime)));
    hello += '}';
    PUSHY_DEBUG("device {} connected (connection {})", device_, id_);
    if (!response.empty()) {
        // The 101 goes out with hello: one write, one wake-up of the device.
        borrow_buffer();
        out_.append(response);
        queued_ += response.size();
    }
    send_frame(ws::opcode::text, hello);
    schedule_timer();

    if (!leftover.empty()) {
        counters::bump(thread_.stats.bytes_in, leftover.size());
        auto code = reader_.feed(leftover.data(), leftover.size(), *this);
        if (code && state_ == state::open) {
            close(code, "bad frame");
        }
    }
    // Through TLS, OpenSSL may hold frames read with the upgrade request.
    if (tls::pending(tls_)) {
        read_soon();
    } else {
        do_wait_read();
    }
    // A newer connection on another node registered right after this one
    // and kicked it before it got here.
    if (kicked) close(ws::close_superseded, "superseded by a newer connection");
}

// ---------------------------------------------------------------- reading

// Waits for readability without a buffer: an idle connection holds none.
void session::do_wait_read() {
    if (reading_ || state_ == state::closed) return;
    reading_ = true;
    socket_.async_wait(tcp::socket::wait_read,
                       [self = shared_from_this()](error_code ec) {
                           self->reading_ = false;
                           self->on_readable(ec);
                       });
}

// Reads on the thread's next turn, without waiting for the socket: for
// bytes it will not signal again (already taken from it by OpenSSL, or
// left behind by a turn that read its share).
void session::read_soon() {
    if (reading_ || state_ == state::closed) return;
    reading_ = true;
    net::post(thread_.ioc, [self = shared_from_this()] {
        self->reading_ = false;
        self->on_readable({});
    });
}

// Drains the socket into the thread's buffer and feeds the frame parser,
// until the socket has nothing more. At most a few buffers per turn, so
// one busy device cannot starve the others on the thread: a device with
// more reads again on its next turn (waiting for the socket would stall
// it: the reactor's epoll is edge-triggered and would not signal bytes
// already there).
void session::on_readable(error_code ec) {
    if (state_ == state::closed) return;
    if (ec) {
        finish();
        return;
    }
    auto& buf = thread_.read_buffer;
    // Through TLS a read returns at most one record (16 KiB).
    const int rounds = tls_ ? 16 : 4;
    for (int round = 0; round < rounds; ++round) {
        std::size_t n = 0;
        auto st = tls::read_some(socket_, tls_, buf.data(), buf.size(), n);
        if (st == tls::io::want_read) return do_wait_read();
        if (st == tls::io::want_write) {
            read_wants_write_ = true;
            if (!writing_) do_wait_write();
            return;
        }
        if (st != tls::io::ok) {
            // EOF or reset: a device that vanishes is normal (debug only).
            if (state_ == state::open) {
                PUSHY_DEBUG("device {} disconnected: {}", device_,
                            st == tls::io::closed ? "closed"
                                                  : tls::last_error());
            }
            finish();
            return;
        }
        counters::bump(thread_.stats.bytes_in, n);
        auto code = reader_.feed(buf.data(), n, *this);
        if (state_ == state::closed) return;
        if (code && state_ == state::open) {
            reject r = code == ws::close_invalid_payload ? reject::invalid_utf8
                       : code == ws::close_too_big       ? reject::message_too_big
                                                         : reject::protocol_error;
            thread_.stats.count(r);
            PUSHY_WARN("device {}: closing with {} ({})", device_, code,
                       reject_name(r));
            close(code, reject_name(r));
        }
        // A plain read shorter than the buffer took all the kernel had.
        if (!tls_ && n < buf.size()) return do_wait_read();
    }
    read_soon();
}

// ----------------------------------------------------------- frame events

void session::on_message(std::string_view payload, bool is_text) {
    counters::bump(thread_.stats.messages_in);
    if (state_ != state::open) return;
    if (!is_text) {
        thread_.stats.count(reject::bad_message);
        send_status("null", 400, "binary messages are not supported");
        return;
    }
    handle_text(payload);
}

void session::on_ping(std::string_view payload) {
    if (state_ == state::open) send_frame(ws::opcode::pong, payload);
}

// A pong ends the wait: the wheel entry moves from the pong deadline to
// the next ping.
void session::on_pong(std::string_view) {
    if (!awaiting_pong_ || state_ != state::open) return;
    awaiting_pong_ = false;
    schedule_timer();
}

// The device started the closing handshake: echo its code (RFC 6455
// section 5.5.1), then close the TCP connection once the reply is out.
void session::on_close(std::uint16_t code, std::string_view) {
    if (state_ == state::closing) {
        // The answer to our own close frame.
        finish();
        return;
    }
    if (state_ != state::open) return;
    PUSHY_DEBUG("device {} closed with {}", device_, code);
    borrow_buffer();
    std::size_t before = out_.size();
    if (code == 1005) {
        ws::encode_frame(out_, ws::opcode::close, {});
    } else {
        ws::encode_close(out_, code);
    }
    queued_ += out_.size() - before;
    state_ = state::closing;
    forget(push_outcome::disconnected, "device closed the connection");
    close_deadline_ = clock::now() + seconds(node_.config().close_timeout_s);
    schedule_timer();
    flush();
}

// Handles one device message. Unknown fields are ignored; an unknown or
// missing `t`, or text that is not a JSON object, is answered with a 400
// status and the connection stays open.
void session::handle_text(std::string_view text) {
    simdjson::dom::element doc;
    auto padded = thread_.padded(text);
    if (thread_.dom.parse(padded.data(), padded.size(), false).get(doc)) {
        thread_.stats.count(reject::bad_message);
        send_status("null", 400, "message is not valid JSON");
        return;
    }
    simdjson::dom::object obj;
    if (doc.get_object().get(obj)) {
        thread_.stats.count(reject::bad_message);
        send_status("null", 400, "message must be a JSON object");
        return;
    }
    // The id is echoed as the device sent it (number or string).
    std::string id_json = "null";
    simdjson::dom::element id;
    if (!obj["id"].get(id) && (id.is_string() || id.is_number())) {
        id_json = simdjson::minify(id);
    }
    std::string_view t;
    if (obj["t"].get_string().get(t)) {
        thread_.stats.count(reject::bad_message);
        send_status(id_json, 400, "message needs a string field 't'");
        return;
    }
    if (t == "ping") {
        send_frame(ws::opcode::text, R"({"t":"pong"})");
    } else if (t == "ack") {
        // A push's numeric id, or a queued message's string id.
        std::uint64_t ack_id = 0;
        std::string_view ack_msg;
        if (obj["id"].get_uint64().get(ack_id) &&
            (obj["id"].get_string().get(ack_msg) || ack_msg.empty())) {
            thread_.stats.count(reject::bad_message);
            send_status(id_json, 400,
                        "ack needs the push's 'id' (a number or a string)");
            return;
        }
        auto it = std::find_if(acks_.begin(), acks_.end(), [&](auto& a) {
            return ack_msg.empty() ? a->msg_id.empty() && a->id == ack_id
                                   : a->msg_id == ack_msg;
        });
        // An unknown id (a late ack after a timeout, or a device bug) is
        // ignored.
        if (it != acks_.end()) {
            settle_ack(it->get(), push_outcome::delivered, {});
        }
    } else if (t == "d2d") {
        handle_d2d(text, obj, id_json);
    } else if (t == "send") {
        handle_send(text, obj, id_json);
    } else if (t == "subscribe" || t == "unsubscribe") {
        handle_subscription(t, obj, id_json);
    } else {
        thread_.stats.count(reject::bad_message);
        std::string reason = "unknown message type '";
        reason.append(t.substr(0, 64));
        reason += '\'';
        send_status(id_json, 400, reason);
    }
}

void session::send_status(std::string_view id_json, int code,
                          std::string_view reason) {
    std::string s;
    s.reserve(64 + reason.size());
    s += R"({"t":"status","id":)";
    s += id_json;
    s += R"(,"code":)";
    s += std::to_string(code);
    if (!reason.empty()) {
        s += R"(,"reason":)";
        json::append_string(s, reason);
    }
    s += '}';
    send_frame(ws::opcode::text, s);
}

bool session::take_d2d_token() {
    const auto& cfg = node_.config();
    auto now_ms = static_cast<std::uint32_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(
            clock::now().time_since_epoch())
            .count());
    auto burst = static_cast<float>(cfg.d2d_burst);
    if (d2d_tokens_ < 0) {
        d2d_tokens_ = burst;
    } else {
        // Unsigned difference: correct across the 49-day wrap.
        std::uint32_t elapsed = now_ms - d2d_filled_ms_;
        d2d_tokens_ = std::min(
            burst, d2d_tokens_ + static_cast<float>(elapsed * cfg.d2d_rate /
                                                    1000.0));
    }
    d2d_filled_ms_ = now_ms;
    if (d2d_tokens_ < 1) return false;
    d2d_tokens_ -= 1;
    return true;
}

// {"t":"d2d","id":M,"to":DEVICE,"data":ANY}: checked here (fields, size,
// rate), then authorized and routed by the node; the answer is a status
// with the same id, and the arrival-to-answer time goes to the histogram.
void session::handle_d2d(std::string_view text, simdjson::dom::object obj,
                         const std::string& id_json) {
    auto arrived = clock::now();
    counters::bump(thread_.stats.d2d_received);
    // Counted before the status is written: a sender that has its
    // status sees it in the stats.
    auto answer = [this, &id_json, arrived](int code, std::string_view why) {
        thread_.stats.count_d2d_status(code);
        thread_.stats.d2d_latency.record(
            std::chrono::duration<double, std::micro>(clock::now() - arrived)
                .count());
        send_status(id_json, code, why);
    };
    std::string_view id, to;
    if (obj["id"].get_string().get(id) || id.empty()) {
        return answer(400, "d2d needs a non-empty string 'id'");
    }
    if (obj["to"].get_string().get(to) || to.empty()) {
        return answer(400, "d2d needs a device id string 'to'");
    }
    if (to.size() > max_device_bytes) {
        return answer(400, "'to' is longer than 256 bytes");
    }
    std::string_view data;
    if (!data_text(text, data)) return answer(400, "d2d needs a field 'data'");
    if (data.size() > node_.config().max_d2d_bytes) {
        return answer(413, "'data' is larger than " +
                               std::to_string(node_.config().max_d2d_bytes) +
                               " bytes");
    }
    if (!take_d2d_token()) return answer(429, "d2d rate limit");

    d2d_message m;
    m.msg_id = id_json;
    m.from = device_;
    m.account = account_;
    m.to = std::string(to);
    m.data = std::string(data);
    node_.send_d2d(
        thread_, std::move(m),
        [self = shared_from_this(), id = id_json, arrived](
            int code, std::string_view why) {
            auto& stats = self->thread_.stats;
            stats.count_d2d_status(code);
            stats.d2d_latency.record(
                std::chrono::duration<double, std::micro>(clock::now() -
                                                          arrived)
                    .count());
            if (self->state_ == state::open) {
                self->send_status(id, code, why);
            }
        });
}

// The data passes through as the device wrote it: this finds its exact
// text, in the thread's padded copy of the message (valid until the next
// message is parsed).
bool session::data_text(std::string_view text, std::string_view& data) {
    simdjson::ondemand::document doc;
    auto padded = thread_.padded(text);
    simdjson::ondemand::value v;
    return !thread_.ondemand
                .iterate(padded.data(), padded.size(),
                         thread_.json_buffer.capacity())
                .get(doc) &&
           !doc["data"].get(v) && !json::raw_text(v, data);
}

namespace {

// Whether `to` is "service:NAME" with NAME of 1 to 64 characters from
// [A-Za-z0-9._-]; `name` then holds NAME.
bool service_name(std::string_view to, std::string_view& name) {
    constexpr std::string_view prefix = "service:";
    if (!to.starts_with(prefix)) return false;
    name = to.substr(prefix.size());
    if (name.empty() || name.size() > 64) return false;
    return std::all_of(name.begin(), name.end(), [](unsigned char c) {
        return std::isalnum(c) || c == '.' || c == '_' || c == '-';
    });
}

}  // namespace

// {"t":"send","id":M,"to":"service:NAME","data":ANY}: checked like a d2d
// message (fields, size, the shared rate), then appended to the service's
// stream by the fleet; answered 202 once Redis has it. Needs a fleet on
// Redis: the embedded registry has no stream to write to.
void session::handle_send(std::string_view text, simdjson::dom::object obj,
                          const std::string& id_json) {
    counters::bump(thread_.stats.sends_received);
    auto answer = [this, &id_json](int code, std::string_view why) {
        upstream_status(id_json, code, why);
    };
    auto* f = node_.fleet();
    if (!f) return answer(503, "needs a fleet on Redis");
    std::string_view id, to, name, data;
    if (obj["id"].get_string().get(id) || id.empty()) {
        return answer(400, "send needs a non-empty string 'id'");
    }
    if (obj["to"].get_string().get(to) || !service_name(to, name)) {
        return answer(400, "send needs 'to' as service:NAME, NAME being 1 "
                           "to 64 of A-Z a-z 0-9 . _ -");
    }
    if (!data_text(text, data)) {
        return answer(400, "send needs a field 'data'");
    }
    auto limit = node_.config().max_d2d_bytes;
    if (data.size() > limit) {
        return answer(413, "'data' is larger than " + std::to_string(limit) +
                               " bytes");
    }
    if (!take_d2d_token()) return answer(429, "send rate limit");

    upstream_message m{std::string(name), std::string(id), std::string(data)};
    f->send_upstream(thread_, *this, std::move(m), upstream_answer(id_json));
}

// {"t":"subscribe"|"unsubscribe","topic":"account.devices"} (optional
// id): the fleet appends the entry to the events stream, which the
// device-list service reads; answered 202 once Redis has it. Rate-limited
// with the d2d bucket, as every device message that writes to Redis is.
void session::handle_subscription(std::string_view kind,
                                  simdjson::dom::object obj,
                                  const std::string& id_json) {
    counters::bump(thread_.stats.subscriptions_received);
    auto answer = [this, &id_json](int code, std::string_view why) {
        upstream_status(id_json, code, why);
    };
    auto* f = node_.fleet();
    if (!f) return answer(503, "needs a fleet on Redis");
    std::string_view topic;
    if (obj["topic"].get_string().get(topic) || topic != "account.devices") {
        return answer(400, std::string(kind) +
                               " needs 'topic': the only topic is "
                               "'account.devices'");
    }
    if (account_.empty()) {
        return answer(403, std::string(kind) +
                               " needs a token with an account (acc)");
    }
    if (node_.config().events_maxlen == 0) {
        return answer(503, "connection events are off on this node");
    }
    if (!take_d2d_token()) return answer(429, std::string(kind) + " rate limit");
    f->subscription(thread_, *this, kind, topic, upstream_answer(id_json));
}

// Answers an upstream message: counted before the status is written (as
// for d2d), so a device that has its status sees it in the stats.
void session::upstream_status(const std::string& id_json, int code,
                              std::string_view why) {
    thread_.stats.count_upstream_status(code);
    send_status(id_json, code, why);
}

// The fleet's answer to an upstream message, on this session's thread.
d2d_done session::upstream_answer(const std::string& id_json) {
    return [self = shared_from_this(), id = id_json](int code,
                                                     std::string_view why) {
        self->upstream_status(id, code, why);
    };
}

// ---------------------------------------------------------------- writing

void session::deliver(push_request req) {
    if (state_ != state::open) {
        req.done(push_outcome::disconnected, "connection is closing");
        return;
    }
    borrow_buffer();
    std::size_t before = out_.size();
    char header[10];
    std::size_t hn = ws::write_frame_header(header, ws::opcode::text,
                                            req.frame.size());
    out_.append(header, hn);
    out_ += req.frame;
    queued_ += out_.size() - before;
    counters::bump(thread_.stats.messages_out);
    auto deadline = clock::now() + req.timeout;
    waiters_.push_back({queued_, deadline, std::move(req)});
    if (out_.size() - out_offset_ > node_.config().max_outbound_bytes) {
        thread_.stats.count(reject::slow_consumer);
        PUSHY_WARN("device {}: slow consumer, {} bytes unsent; closing",
                   device_, out_.size() - out_offset_);
        drop_slow_consumer(push_outcome::disconnected,
                           "device reads too slowly; connection closed");
        return;
    }
    flush();
}

void session::send_frame(ws::opcode op, std::string_view payload) {
    // Nothing may follow our close frame (RFC 6455 section 5.5.1).
    if (state_ != state::open) return;
    borrow_buffer();
    std::size_t before = out_.size();
    ws::encode_frame(out_, op, payload);
    queued_ += out_.size() - before;
    flush();
}

// Writes what the kernel takes now; waits for writability for the rest.
// Most pushes go out here with one send() and no Asio operation at all.
void session::flush() {
    if (writing_ || state_ == state::closed) return;
    while (out_offset_ < out_.size()) {
        std::size_t size = out_.size() - out_offset_;
        std::size_t n = 0;
        auto st = tls::write_some(socket_, tls_, out_.data() + out_offset_,
                                  size, n);
        if (st == tls::io::want_write) {
            if (tls_) {
                tls_offered_ = static_cast<std::uint32_t>(
                    std::min<std::size_t>(size, UINT32_MAX));
            }
            complete_writes();
            do_wait_write();
            // The kernel's buffer is full: the oldest waiting push now has
            // a deadline on the wheel.
            if (!waiters_.empty()) schedule_timer();
            return;
        }
        if (st != tls::io::ok) {
            // Includes a TLS write that wants a read: renegotiation is off,
            // so only a broken peer asks for one.
            if (state_ == state::open) {
                PUSHY_DEBUG("device {}: write failed: {}", device_,
                            tls::last_error());
            }
            finish();
            return;
        }
        tls_offered_ = 0;
        out_offset_ += n;
        written_ += n;
        counters::bump(thread_.stats.bytes_out, n);
    }
    out_.clear();
    out_offset_ = 0;
    return_buffer();
    complete_writes();
    if (state_ == state::closing) {
        // Our close frame is out; half-close so the device sees the end
        // and answers, while we read its close frame (RFC 6455 7.1.1).
        // Through TLS the close_notify goes first (RFC 8446 6.1).
        tls::shutdown(tls_);
        error_code ec;
        socket_.shutdown(tcp::socket::shutdown_send, ec);
    }
}

// Takes the io thread's write buffer when this connection holds no unsent
// bytes, so a frame that the kernel takes at once costs no allocation.
void session::borrow_buffer() {
    if (out_.empty() && !writing_) out_.swap(thread_.write_buffer);
}

// Gives the larger of the two (empty) buffers to the io thread and frees
// the other: an idle connection keeps no write buffer.
void session::return_buffer() {
    // A burst to a slow device may have grown the buffer far beyond what
    // one frame needs; the thread keeps at most this much.
    constexpr std::size_t keep_bytes = 256 * 1024;
    if (out_.capacity() > thread_.write_buffer.capacity()) {
        out_.swap(thread_.write_buffer);
    }
    std::string().swap(out_);
    if (thread_.write_buffer.capacity() > keep_bytes) {
        std::string().swap(thread_.write_buffer);
    }
}

void session::do_wait_write() {
    writing_ = true;
    socket_.async_wait(tcp::socket::wait_write,
                       [self = shared_from_this()](error_code ec) {
                           self->on_writable(ec);
                       });
}

void session::on_writable(error_code ec) {
    writing_ = false;
    if (state_ == state::closed) return;
    if (ec) {
        finish();
        return;
    }
    flush();
    if (read_wants_write_ && state_ != state::closed) {
        read_wants_write_ = false;
        on_readable({});
    }
}

// Reports every push whose frame the kernel has fully taken. One that asked
// for the device's ack now waits for it, on the wheel.
void session::complete_writes() {
    std::size_t done = 0;
    for (; done < waiters_.size() && waiters_[done].end <= written_; ++done) {
        auto& req = waiters_[done].req;
        if (!req.want_ack) {
            req.done(push_outcome::delivered, {});
            continue;
        }
        auto a = std::make_unique<pending_ack>();
        a->owner = this;
        a->id = req.id;
        a->msg_id = std::move(req.msg_id);
        a->done = std::move(req.done);
        a->fire = &pending_ack::on_timer;
        thread_.wheel.schedule(*a, clock::now() + req.timeout);
        acks_.push_back(std::move(a));
    }
    waiters_.erase(waiters_.begin(), waiters_.begin() + done);
    if (waiters_.empty() && waiters_.capacity() > 8) {
        std::vector<write_waiter>().swap(waiters_);
    }
}

// Reports the outcome of push `p`, one of those waiting for an ack.
void session::settle_ack(pending_ack* p, push_outcome o,
                         std::string_view why) {
    auto it = std::find_if(acks_.begin(), acks_.end(),
                           [p](auto& a) { return a.get() == p; });
    if (it == acks_.end()) return;
    auto a = std::move(*it);
    *it = std::move(acks_.back());
    acks_.pop_back();
    timer_wheel::cancel(*a);
    a->done(o, why);
    if (acks_.empty()) std::vector<std::unique_ptr<pending_ack>>().swap(acks_);
}

// ---------------------------------------------------------------- closing

void session::close(std::uint16_t code, std::string_view reason) {
    if (state_ != state::open) return;
    if (code == ws::close_superseded) {
        thread_.stats.count(reject::superseded);
        PUSHY_DEBUG("device {}: connection {} superseded", device_, id_);
    }
    borrow_buffer();
    std::size_t before = out_.size();
    ws::encode_close(out_, code, reason);
    queued_ += out_.size() - before;
    state_ = state::closing;
    forget(push_outcome::disconnected, "connection closed");
    close_deadline_ = clock::now() + seconds(node_.config().close_timeout_s);
    schedule_timer();
    flush();
}

// Removes the device from the table (only if this connection still owns
// the entry) and fails the pushes waiting for an ack.
void session::forget(push_outcome o, std::string_view why) {
    if (registered_) {
        registered_ = false;
        bool owner = node_.table().remove(device_, this);
        if (auto* f = node_.fleet()) f->disconnected(*this, owner);
        counters::bump(thread_.stats.connections_closed);
    }
    auto acks = std::move(acks_);
    for (auto& a : acks) {
        timer_wheel::cancel(*a);
        a->done(o, why);
    }
}

void session::finish() {
    if (state_ == state::closed) return;
    forget(push_outcome::disconnected, "connection closed");
    state_ = state::closed;
    timer_wheel::cancel(*this);
    auto waiters = std::move(waiters_);
    for (auto& w : waiters) {
        w.req.done(push_outcome::disconnected,
                   "connection closed before the push was written");
    }
    error_code ec;
    socket_.close(ec);
    tls::release(std::exchange(tls_, nullptr));
    std::string().swap(out_);
    if (started_) {
        node_.live_sessions.fetch_sub(1, std::memory_order_relaxed);
    }
}

// Closes a device that reads too slowly with 4003. Frames not yet started
// are discarded and every waiting push is answered `o`; the frame being
// written is finished first, so the close frame follows a whole frame. A
// device that reads nothing more is dropped at the close deadline.
void session::drop_slow_consumer(push_outcome o, std::string_view why) {
    // out_ always starts on a frame boundary (it is only emptied when fully
    // written), so walking our own unmasked headers from its start finds
    // the end of the frame that holds out_offset_. Through TLS, bytes
    // already framed into a pending record are kept whole too.
    std::size_t keep = out_offset_ + tls_offered_;
    std::size_t cut = 0;
    while (cut < keep && cut + 2 <= out_.size()) {
        auto b = reinterpret_cast<const unsigned char*>(out_.data() + cut);
        std::uint64_t len = b[1] & 0x7f;
        std::size_t head = 2;
        if (len == 126) {
            len = (std::uint64_t{b[2]} << 8) | b[3];
            head = 4;
        } else if (len == 127) {
            len = 0;
            for (int i = 0; i < 8; ++i) len = (len << 8) | b[2 + i];
            head = 10;
        }
        cut += head + len;
    }
    cut = std::min(cut, out_.size());
    std::uint64_t kept_end = queued_ - (out_.size() - cut);
    out_.resize(cut);
    out_.shrink_to_fit();
    queued_ = kept_end;

    // Every waiting push is answered now, without waiting for the device:
    // discarded frames never arrive, and the one partly written arrives
    // only if the device reads on (a device drops duplicates by id).
    auto waiters = std::move(waiters_);
    for (auto& w : waiters) w.req.done(o, why);
    close(ws::close_slow_consumer, "slow consumer");
}

// ----------------------------------------------------------------- timers

void session::schedule_timer() {
    clock::time_point next;
    if (state_ == state::closing) {
        next = close_deadline_;
    } else {
        next = awaiting_pong_ ? pong_deadline_ : next_ping_;
        if (has_expiry_) next = std::min(next, token_expiry_);
        // Before the reconnect message: when to send it; after: when the
        // grace period of a device that did not leave ends.
        next = std::min(next, lifetime_end_);
        if (writing_ && !waiters_.empty()) {
            next = std::min(next, waiters_.front().deadline);
        }
    }
    thread_.wheel.schedule(*this, next);
}

// Sends {"t":"reconnect"} (its lifetime ended, or the node drains) and
// gives the device reconnect_grace_s to leave before closing it.
void session::send_reconnect(clock::time_point now) {
    reconnect_sent_ = true;
    lifetime_end_ = now + seconds(node_.config().reconnect_grace_s);
    if (draining_) {
        counters::bump(thread_.stats.reconnects_drain);
        send_frame(ws::opcode::text,
                   R"({"t":"reconnect","in_ms":0,"reason":"drain"})");
    } else {
        counters::bump(thread_.stats.reconnects_lifetime);
        send_frame(ws::opcode::text,
                   R"({"t":"reconnect","in_ms":0,"reason":"lifetime"})");
    }
}

void session::drain_at(clock::time_point at) {
    if (state_ != state::open || reconnect_sent_) return;
    draining_ = true;
    if (at < lifetime_end_) lifetime_end_ = at;
    schedule_timer();
}

void session::on_timer(timer_entry* e) {
    static_cast<session*>(e)->on_deadline();
}

// Runs every deadline that has passed: close timeout, pong timeout, token
// expiry, lifetime, and the next heartbeat ping.
void session::on_deadline() {
    auto now = clock::now();
    if (state_ == state::closed) return;
    if (state_ == state::closing) {
        if (now >= close_deadline_) {
            finish();
        } else {
            schedule_timer();
        }
        return;
    }
    const auto& cfg = node_.config();
    if (writing_ && !waiters_.empty() && now >= waiters_.front().deadline) {
        // The device has not taken a push within its timeout: it reads too
        // slowly to keep. Unsent frames go with the connection, so each
        // waiting push is answered 504.
        thread_.stats.count(reject::slow_consumer);
        PUSHY_WARN("device {}: slow consumer, push not written within its "
                   "timeout ({} bytes unsent); closing",
                   device_, out_.size() - out_offset_);
        drop_slow_consumer(push_outcome::timeout,
                           "device did not take the push within the timeout");
        return;
    }
    if (awaiting_pong_ && now >= pong_deadline_) {
        thread_.stats.count(reject::pong_timeout);
        PUSHY_WARN("device {}: no pong within {}s; dropping", device_,
                   cfg.pong_timeout_s);
        finish();
        return;
    }
    if (has_expiry_ && now >= token_expiry_) {
        thread_.stats.count(reject::token_expired_live);
        PUSHY_DEBUG("device {}: token expired", device_);
        close(ws::close_token_expired, "token expired");
        return;
    }
    if (now >= lifetime_end_) {
        if (reconnect_sent_) {
            // Asked to reconnect a grace period ago and still here.
            counters::bump(thread_.stats.reconnect_closes);
            PUSHY_DEBUG("device {}: still connected {}s after its reconnect; "
                        "closing",
                        device_, cfg.reconnect_grace_s);
            close(ws::close_going_away, "reconnect requested");
            return;
        }
        send_reconnect(now);
    }
    if (!awaiting_pong_ && now >= next_ping_) {
        awaiting_pong_ = true;
        pong_deadline_ = now + seconds(cfg.pong_timeout_s);
        next_ping_ = now + seconds(cfg.heartbeat_s * jitter(0.9));
        counters::bump(thread_.stats.pings_sent);
        send_frame(ws::opcode::ping, {});
    }
    if (state_ == state::open) schedule_timer();
}

}  // namespace pushy
