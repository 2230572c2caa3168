#include "net/upgrade.hpp"

#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/string.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/rfc7230.hpp>

#include <chrono>
#include <optional>
#include <utility>

#include "core/logging.hpp"
#include "core/node_impl.hpp"
#include "detail/json_out.hpp"
#include "detail/url.hpp"
#include "net/session.hpp"
#include "net/tls.hpp"
#include "net/ws_codec.hpp"

namespace pushy {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
using boost::system::error_code;

namespace {

constexpr std::string_view subprotocol = "pushy.v1";

// Maps a token error to the reject counter of the same name.
reject reject_for(auth::token_error e) {
    using auth::token_error;
    switch (e) {
        case token_error::missing: return reject::token_missing;
        case token_error::malformed: return reject::token_malformed;
        case token_error::bad_signature: return reject::token_bad_signature;
        case token_error::wrong_algorithm:
            return reject::token_wrong_algorithm;
        case token_error::expired: return reject::token_expired;
        case token_error::no_expiry: return reject::token_no_expiry;
        case token_error::no_device:
        case token_error::long_device: return reject::token_no_device;
        case token_error::bad_meta: return reject::token_bad_meta;
        default: return reject::token_bad_audience;
    }
}

// True when the comma-separated header value holds `token`, compared
// without case (RFC 7230 section 3.2.6 tokens).
bool has_token(std::string_view value, std::string_view token) {
    for (auto item : http::token_list(value)) {
        if (beast::iequals(item, token)) return true;
    }
    return false;
}

class upgrade : public std::enable_shared_from_this<upgrade>,
                public timer_entry {
public:
    using tcp = net::ip::tcp;
    using clock = std::chrono::steady_clock;

    upgrade(node_impl& node, io_thread& thread, tcp::socket s)
        : node_(node),
          thread_(thread),
          socket_(std::move(s)),
          buffer_(node.config().max_header_bytes + 4096) {
        // Counted up by the acceptor, down here.
        fire = &upgrade::on_timer;
    }

    ~upgrade() {
        timer_wheel::cancel(*this);
        tls::release(tls_);
        node_.pending_upgrades.fetch_sub(1, std::memory_order_relaxed);
    }

    // Starts with the TLS handshake when the node has TLS, else with the
    // request.
    void run() {
        error_code ec;
        socket_.non_blocking(true, ec);
        // Frames go out as they are made, and a TLS flight of several
        // writes must not wait for the device's delayed ACK (Nagle).
        socket_.set_option(tcp::no_delay(true), ec);
        if (auto* ctx = node_.tls()) {
            tls_ = ctx->accept_on(socket_.native_handle());
            if (!tls_) {
                PUSHY_WARN("TLS: cannot make a connection: {}",
                           tls::last_error());
                return close();
            }
            phase_ = phase::handshake;
            arm(node_.config().tls_handshake_timeout_s);
            return do_handshake();
        }
        start_request();
    }

private:
    enum class phase : std::uint8_t { handshake, request, answer, drain };

    // The deadline of the current phase, on the thread's wheel: no timer
    // of its own.
    void arm(double seconds) {
        thread_.wheel.schedule(
            *this, clock::now() + std::chrono::duration_cast<clock::duration>(
                                      std::chrono::duration<double>(seconds)));
    }

    static void on_timer(timer_entry* e) {
        static_cast<upgrade*>(e)->on_deadline();
    }

    // The phase took too long: the connection is closed without an answer
    // (its pending wait ends with operation_aborted, releasing this).
    void on_deadline() {
        if (phase_ == phase::handshake) {
            thread_.stats.count(reject::tls_handshake_timeout);
            PUSHY_DEBUG("TLS handshake timed out");
        } else if (phase_ == phase::request) {
            thread_.stats.count(reject::upgrade_timeout);
            PUSHY_DEBUG("upgrade timed out");
        }
        close();
    }

    void close() {
        timer_wheel::cancel(*this);
        error_code ec;
        socket_.close(ec);
    }

    // Waits until the socket can be read (or written, for `want_write`)
    // and calls `next`; nothing once the connection is closed.
    void wait(tls::io want, void (upgrade::*next)()) {
        auto w = want == tls::io::want_write ? tcp::socket::wait_write
                                             : tcp::socket::wait_read;
        socket_.async_wait(w, [self = shared_from_this(), next](error_code ec) {
            if (ec || !self->socket_.is_open()) return;
            ((*self).*next)();
        });
    }

    void do_handshake() {
        switch (auto st = tls::handshake(tls_)) {
            case tls::io::ok:
                counters::bump(thread_.stats.tls_handshakes);
                return start_request();
            case tls::io::want_read:
            case tls::io::want_write: return wait(st, &upgrade::do_handshake);
            default:
                // Plain HTTP to the TLS port, a client that rejects the
                // certificate, a scanner: counted, logged at debug.
                thread_.stats.count(reject::tls_handshake_failed);
                PUSHY_DEBUG("TLS handshake failed: {}", tls::last_error());
                return close();
        }
    }

    void start_request() {
        phase_ = phase::request;
        parser_.emplace();
        parser_->header_limit(
            static_cast<std::uint32_t>(node_.config().max_header_bytes));
        arm(node_.config().upgrade_timeout_s);
        do_read();
    }

    // Reads until the request header is whole, then checks it. Bytes past
    // the header (the device's first frames, if it was quick) stay in
    // buffer_ for the session.
    void do_read() {
        for (;;) {
            std::size_t room = buffer_.max_size() - buffer_.size();
            if (room == 0) break;  // the parser reports header_limit below
            auto space = buffer_.prepare(std::min<std::size_t>(room, 4096));
            std::size_t n = 0;
            auto st = tls::read_some(socket_, tls_,
                                     static_cast<char*>(space.data()),
                                     space.size(), n);
            if (st == tls::io::want_read || st == tls::io::want_write) {
                return wait(st, &upgrade::do_read);
            }
            // A client that leaves before its request is whole is no
            // error of ours.
            if (st != tls::io::ok) return close();
            buffer_.commit(n);
            error_code ec;
            std::size_t used = parser_->put(buffer_.data(), ec);
            buffer_.consume(used);
            if (ec == http::error::need_more) continue;
            if (ec) return on_bad_request(ec);
            if (parser_->is_header_done()) break;
        }
        if (!parser_->is_header_done()) {
            return on_bad_request(http::error::header_limit);
        }
        timer_wheel::cancel(*this);
        check(parser_->get());
    }

    void on_bad_request(error_code ec) {
        if (ec == http::error::header_limit ||
            ec == http::error::buffer_overflow) {
            return refuse(http::status::request_header_fields_too_large,
                          reject::headers_too_large,
                          "request headers exceed the limit of " +
                              std::to_string(
                                  node_.config().max_header_bytes) +
                              " bytes");
        }
        refuse(http::status::bad_request, reject::bad_request,
               "malformed HTTP request: " + ec.message());
    }

    // Checks the request in the order that gives the most useful answer.
    void check(const http::request<http::empty_body>& req) {
        const auto& cfg = node_.config();
        std::size_t fields = std::distance(req.begin(), req.end());
        if (fields > cfg.max_headers) {
            return refuse(http::status::request_header_fields_too_large,
                          reject::too_many_headers,
                          "more than " + std::to_string(cfg.max_headers) +
                              " header fields");
        }
        if (req.version() != 11) {
            return refuse(http::status::bad_request,
                          reject::bad_http_version,
                          "a websocket upgrade needs HTTP/1.1");
        }
        if (req.method() != http::verb::get) {
            return refuse(http::status::bad_request, reject::bad_method,
                          "a websocket upgrade must be a GET request");
        }
        std::string_view target = req.target();
        if (target.substr(0, target.find('?')) != "/v1/connect") {
            return refuse(http::status::not_found, reject::bad_path,
                          "devices connect at /v1/connect");
        }
        if (!has_token(req[http::field::upgrade], "websocket") ||
            !has_token(req[http::field::connection], "upgrade")) {
            return refuse(http::status::bad_request, reject::not_upgrade,
                          "expected 'Upgrade: websocket' and "
                          "'Connection: Upgrade'");
        }
        if (req[http::field::sec_websocket_version] != "13") {
            // RFC 6455 section 4.4: name the version we speak.
            return refuse(http::status::upgrade_required,
                          reject::bad_ws_version,
                          "websocket version 13 required");
        }
        if (!ws::valid_client_key(req[http::field::sec_websocket_key])) {
            return refuse(http::status::bad_request, reject::bad_ws_key,
                          "Sec-WebSocket-Key must be base64 of 16 bytes");
        }
        if (!cfg.allowed_origins.empty() &&
            req.count(http::field::origin) != 0) {
            auto origin = req[http::field::origin];
            bool ok = false;
            for (auto& o : cfg.allowed_origins) ok = ok || o == origin;
            if (!ok) {
                return refuse(http::status::forbidden, reject::bad_origin,
                              "origin not allowed");
            }
        }
        bool offered = req.count(http::field::sec_websocket_protocol) != 0;
        if (offered &&
            !has_token(req[http::field::sec_websocket_protocol],
                       subprotocol)) {
            return refuse(http::status::bad_request, reject::bad_subprotocol,
                          "the only subprotocol is pushy.v1");
        }
        // Admission, before the token costs a signature check. A device
        // refused here tries again after Retry-After (another node, with a
        // shared port or a load balancer).
        if (node_.stopping()) {
            return refuse(http::status::service_unavailable,
                          reject::shutting_down, "node is shutting down", 1);
        }
        if (node_.draining()) {
            return refuse(http::status::service_unavailable, reject::draining,
                          "node is draining", 1);
        }
        if (node_.table().size() >= node_.max_connections()) {
            return refuse(http::status::service_unavailable,
                          reject::too_many_connections,
                          "node is at its connection limit", 5);
        }
        if (cfg.accept_rate > 0 && !thread_.take_accept_token(cfg)) {
            return refuse(http::status::service_unavailable,
                          reject::accept_rate,
                          "node is over its accept rate", 1);
        }

        // Authenticate: header first, then ?token= for browsers.
        std::string token;
        auto auth = req[http::field::authorization];
        if (auth.size() > 7 && beast::iequals(auth.substr(0, 7), "bearer ")) {
            token = std::string(auth.substr(7));
        } else {
            token = url::query_param(target, "token");
        }
        auto now = std::chrono::duration_cast<std::chrono::seconds>(
                       std::chrono::system_clock::now().time_since_epoch())
                       .count();
        auto result = node_.verifier().verify(token, now);
        if (result.error != auth::token_error::none) {
            std::string why(auth::describe(result.error));
            if (result.error == auth::token_error::missing && !auth.empty()) {
                why += ": the Authorization header is not 'Bearer <token>'";
            }
            return refuse(http::status::unauthorized,
                          reject_for(result.error), std::move(why));
        }
        accept(req[http::field::sec_websocket_key], offered,
               std::move(result.claims));
    }

    // Hands the socket to a session with the 101 response, which it sends
    // together with hello once the device is registered: a device that has
    // its 101 can be pushed to from any node.
    void accept(std::string_view key, bool with_protocol,
                auth::claims claims) {
        std::string response =
            "HTTP/1.1 101 Switching Protocols\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            "Sec-WebSocket-Accept: ";
        response += ws::accept_key(key);
        response += "\r\n";
        if (with_protocol) {
            response += "Sec-WebSocket-Protocol: pushy.v1\r\n";
        }
        response += "\r\n";
        auto data = buffer_.data();
        std::string_view leftover(static_cast<const char*>(data.data()),
                                  data.size());
        // The meta claim goes to the connected event, not into the session.
        auto meta = std::move(claims.meta);
        auto s = std::make_shared<session>(node_, thread_, std::move(socket_),
                                           std::move(claims),
                                           std::exchange(tls_, nullptr));
        s->start(leftover, std::move(meta), std::move(response));
    }

    // Answers an error and closes. Each refusal is counted by reason; a
    // broken limit is a warning, the rest are debug (clients retry often).
    void refuse(http::status status, reject why, std::string reason,
                int retry_after_s = 0) {
        thread_.stats.count(why);
        if (status == http::status::request_header_fields_too_large) {
            PUSHY_WARN("upgrade refused ({}): {}", reject_name(why), reason);
        } else {
            PUSHY_DEBUG("upgrade refused ({}): {}", reject_name(why), reason);
        }
        std::string body = R"({"error":)";
        json::append_string(body, reason);
        body += "}\n";
        response_ = "HTTP/1.1 ";
        response_ += std::to_string(static_cast<unsigned>(status));
        response_ += ' ';
        response_ += http::obsolete_reason(status);
        response_ += "\r\nContent-Type: application/json\r\n";
        if (status == http::status::upgrade_required) {
            response_ += "Sec-WebSocket-Version: 13\r\nUpgrade: websocket\r\n";
        }
        if (status == http::status::unauthorized) {
            response_ += "WWW-Authenticate: Bearer error=\"invalid_token\"\r\n";
        }
        if (retry_after_s > 0) {
            response_ += "Retry-After: " + std::to_string(retry_after_s) +
                         "\r\n";
        }
        response_ += "Connection: close\r\nContent-Length: ";
        response_ += std::to_string(body.size());
        response_ += "\r\n\r\n";
        response_ += body;
        phase_ = phase::answer;
        // The answer and the drain after it have 2 s, whatever the client
        // does.
        arm(2);
        do_answer();
    }

    // Writes the answer, then ends our side (TLS close_notify, TCP FIN).
    void do_answer() {
        while (written_ < response_.size()) {
            std::size_t n = 0;
            auto st = tls::write_some(socket_, tls_,
                                      response_.data() + written_,
                                      response_.size() - written_, n);
            if (st == tls::io::want_read || st == tls::io::want_write) {
                return wait(st, &upgrade::do_answer);
            }
            if (st != tls::io::ok) return close();
            written_ += n;
        }
        tls::shutdown(tls_);
        error_code ec;
        socket_.shutdown(tcp::socket::shutdown_send, ec);
        phase_ = phase::drain;
        do_drain();
    }

    // Reads and discards what the client still sends until it closes, so
    // closing never resets a connection whose answer is still unread.
    void do_drain() {
        for (;;) {
            std::size_t n = 0;
            auto st = tls::read_some(socket_, tls_, thread_.read_buffer.data(),
                                     thread_.read_buffer.size(), n);
            if (st == tls::io::want_read || st == tls::io::want_write) {
                return wait(st, &upgrade::do_drain);
            }
            if (st != tls::io::ok) return close();
        }
    }

    node_impl& node_;
    io_thread& thread_;
    tcp::socket socket_;
    tls::SSL* tls_ = nullptr;
    beast::flat_buffer buffer_;
    std::optional<http::request_parser<http::empty_body>> parser_;
    std::string response_;
    std::size_t written_ = 0;
    phase phase_ = phase::request;
};

}  // namespace

void start_upgrade(node_impl& node, io_thread& thread,
                   net::ip::tcp::socket socket) {
    std::make_shared<upgrade>(node, thread, std::move(socket))->run();
}

}  // namespace pushy
