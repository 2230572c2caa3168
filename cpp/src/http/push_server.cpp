#include "http/push_server.hpp"

#include <boost/asio/post.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>

#include <optional>

#include "core/logging.hpp"
#include "core/node_impl.hpp"
#include "detail/json_out.hpp"
#include "detail/json_raw.hpp"
#include "detail/url.hpp"
#include "metrics/prometheus.hpp"
#include "net/session.hpp"
#include "routing/fleet.hpp"

namespace pushy {

namespace net = boost::asio;
namespace beast = boost::beast;
namespace http = beast::http;
namespace od = simdjson::ondemand;
using boost::system::error_code;

namespace {

// A batch body may carry this many bytes; a single push is held to
// max_push_bytes of data on top.
constexpr std::size_t max_body_bytes = 16 << 20;
constexpr double max_timeout_ms = 3'600'000;

// One push as a service asked for it.
struct push_spec {
    std::string device;
    std::string_view data;  // raw JSON, into the parsed body
    std::string_view from = "api";
    bool want_ack = false;
    double timeout_ms = 0;
};

// Reads one push object. Returns an empty string when it is valid, else
// the reason; `too_large` says the reason is the data size (413).
std::string read_push(od::object obj, push_spec& p, std::size_t max_data,
                      bool& too_large) {
    bool has_device = false, has_data = false;
    for (auto field : obj) {
        std::string_view key;
        if (field.unescaped_key().get(key)) return "malformed field name";
        od::value v = field.value();
        if (key == "device") {
            std::string_view d;
            if (v.get_string().get(d)) {
                return "'device' must be a string";
            }
            p.device = std::string(d);
            has_device = true;
        } else if (key == "data") {
            if (json::raw_text(v, p.data)) return "malformed 'data'";
            has_data = true;
        } else if (key == "ack") {
            std::string_view a;
            if (v.get_string().get(a) || (a != "written" && a != "client")) {
                return "'ack' must be \"written\" or \"client\"";
            }
            p.want_ack = a == "client";
        } else if (key == "timeout_ms") {
            double t;
            if (v.get_double().get(t) || !(t > 0) || t > max_timeout_ms) {
                return "'timeout_ms' must be a number of milliseconds "
                       "between 0 and 3600000";
            }
            p.timeout_ms = t;
        } else if (key == "from") {
            std::string_view f;
            if (v.get_string().get(f) || f.empty() || f.size() > 64) {
                return "'from' must be a service name of 1 to 64 bytes";
            }
            p.from = f;
        }
    }
    if (!has_device) return "missing 'device'";
    if (p.device.empty()) return "'device' must not be empty";
    if (p.device.size() > max_device_bytes) {
        return "'device' is longer than 256 bytes";
    }
    if (!has_data) return "missing 'data'";
    if (p.data.size() > max_data) {
        too_large = true;
        return "'data' is larger than " + std::to_string(max_data) + " bytes";
    }
    return {};
}

// The JSON result of one push.
std::string result_json(std::string_view node, push_outcome o,
                        std::string_view device, std::uint64_t id,
                        std::string_view reason) {
    std::string s;
    s.reserve(96 + device.size() + reason.size());
    s += R"({"status":")";
    s += status_name(o);
    s += R"(","code":)";
    s += std::to_string(status_code(o));
    s += R"(,"node":)";
    json::append_string(s, node);
    s += R"(,"device":)";
    json::append_string(s, device);
    s += R"(,"id":)";
    s += id ? std::to_string(id) : "null";
    if (!reason.empty()) {
        s += R"(,"reason":)";
        json::append_string(s, reason);
    }
    s += '}';
    return s;
}

// The outcome a push answered elsewhere counts as here.
push_outcome outcome_of(int code) {
    switch (code) {
        case 200: return push_outcome::delivered;
        case 400: return push_outcome::bad_request;
        case 404: return push_outcome::not_connected;
        case 413: return push_outcome::too_large;
        case 504: return push_outcome::timeout;
        default: return push_outcome::unavailable;
    }
}

// The JSON result of a push answered by another node (or by the link).
std::string remote_result_json(const peer::reply& r, std::string_view self,
                               std::string_view device) {
    std::string s;
    s.reserve(96 + device.size() + r.reason.size());
    s += R"({"status":)";
    json::append_string(s, r.status);
    s += R"(,"code":)";
    s += std::to_string(r.code);
    s += R"(,"node":)";
    // A reply made here (registry lookup, link failure) names this node.
    json::append_string(s, r.node.empty() ? self : r.node);
    s += R"(,"device":)";
    json::append_string(s, device);
    s += R"(,"id":)";
    s += r.push_id ? std::to_string(r.push_id) : "null";
    if (!r.reason.empty()) {
        s += R"(,"reason":)";
        json::append_string(s, r.reason);
    }
    s += '}';
    return s;
}

class http_session : public std::enable_shared_from_this<http_session> {
public:
    http_session(node_impl& node, io_thread& thread, net::ip::tcp::socket s)
        : node_(node), thread_(thread), stream_(std::move(s)) {}

    void run() { do_read(); }

private:
    // Reads the next request; idle keep-alive connections time out.
    void do_read() {
        parser_.emplace();
        parser_->body_limit(max_body_bytes);
        parser_->header_limit(
            static_cast<std::uint32_t>(node_.config().max_header_bytes));
        stream_.expires_after(std::chrono::seconds(120));
        http::async_read(stream_, buffer_, *parser_,
                         [self = shared_from_this()](error_code ec,
                                                     std::size_t) {
                             self->on_read(ec);
                         });
    }

    void on_read(error_code ec) {
        if (ec == http::error::end_of_stream || ec == beast::error::timeout ||
            ec == net::error::connection_reset || ec == net::error::eof) {
            return close();
        }
        if (ec == http::error::body_limit) {
            keep_alive_ = false;
            return respond(http::status::payload_too_large,
                           R"({"status":"too_large","code":413,)"
                           R"("reason":"request body exceeds 16 MiB"})");
        }
        if (ec == http::error::header_limit) {
            keep_alive_ = false;
            return respond(http::status::request_header_fields_too_large,
                           R"({"error":"request headers too large"})");
        }
        if (ec) {
            keep_alive_ = false;
            return respond(http::status::bad_request,
                           R"({"error":"malformed HTTP request"})");
        }
        keep_alive_ = parser_->get().keep_alive();
        handle(parser_->get());
    }

    void handle(http::request<http::string_body>& req) {
        std::string_view target = req.target();
        target = target.substr(0, target.find('?'));
        auto method = req.method();
        if (target == "/v1/push") {
            if (method != http::verb::post) return not_allowed("POST");
            return push_one(req.body());
        }
        if (target == "/v1/push/batch") {
            if (method != http::verb::post) return not_allowed("POST");
            return push_batch(req.body());
        }
        if (target == "/healthz") {
            if (method != http::verb::get) return not_allowed("GET");
            // A draining node is alive but takes no devices: a readiness
            // probe (or a balancer's health check) sends them elsewhere.
            bool draining = node_.draining();
            std::string b = draining ? R"({"status":"draining","node":)"
                                     : R"({"status":"ok","node":)";
            json::append_string(b, node_.node_id());
            b += ",\"connections\":" + std::to_string(node_.table().size());
            b += '}';
            return respond(draining ? http::status::service_unavailable
                                    : http::status::ok,
                           b);
        }
        if (target == "/v1/drain") {
            if (method != http::verb::post) return not_allowed("POST");
            return drain(req.body());
        }
        if (target == "/metrics") {
            if (method != http::verb::get) return not_allowed("GET");
            return respond(http::status::ok,
                           metrics::prometheus_text(node_.stats_json(),
                                                    thread_.dom),
                           "text/plain; version=0.0.4");
        }
        if (target == "/v1/stats") {
            if (method != http::verb::get) return not_allowed("GET");
            return respond(http::status::ok, node_.stats_json());
        }
        constexpr std::string_view devices = "/v1/devices/";
        if (target.starts_with(devices) && target.size() > devices.size()) {
            if (method != http::verb::get) return not_allowed("GET");
            return device_info(url::percent_decode(target.substr(devices.size())));
        }
        respond(http::status::not_found, R"({"error":"not found"})");
    }

    void not_allowed(std::string_view allow) {
        res_extra_allow_ = allow;
        respond(http::status::method_not_allowed,
                R"({"error":"method not allowed"})");
    }

    // Parses and validates `body` (a whole JSON document). Returns the
    // reason it is not valid JSON, or empty.
    std::string_view validate_json(const std::string& body) {
        auto padded = thread_.padded(body);
        simdjson::dom::element ignored;
        auto err = thread_.dom.parse(padded.data(), padded.size(), false)
                       .get(ignored);
        if (err == simdjson::DEPTH_ERROR) {
            return "body nests deeper than 1024 levels";
        }
        if (err) return "body is not valid JSON";
        return {};
    }

    // Answers a push refused before it was sent; `device` as far as read.
    void bad_push(std::string_view reason, bool too_large = false,
                  std::string_view device = {}) {
        thread_.stats.count(too_large ? push_outcome::too_large
                                      : push_outcome::bad_request);
        thread_.stats.count(reject::bad_push);
        auto o = too_large ? push_outcome::too_large : push_outcome::bad_request;
        respond(static_cast<http::status>(status_code(o)),
                result_json(node_.node_id(), o, device, 0, reason));
    }

    void push_one(const std::string& body) {
        if (auto why = validate_json(body); !why.empty()) return bad_push(why);
        od::document doc;
        od::object obj;
        auto& json = thread_.json_buffer;
        if (thread_.ondemand.iterate(json.data(), json.size(), json.capacity())
                .get(doc) ||
            doc.get_object().get(obj)) {
            return bad_push("body must be a JSON object");
        }
        push_spec p;
        bool too_large = false;
        auto why = read_push(obj, p, node_.config().max_push_bytes, too_large);
        if (!why.empty()) return bad_push(why, too_large, p.device);
        dispatch(p, [self = shared_from_this()](std::string result, int code) {
            self->respond(static_cast<http::status>(code), result);
        });
    }

    // Sends one push to the device: to its session when it is connected
    // here, else through the fleet to its node. `reply` runs on this HTTP
    // connection's thread with the result JSON and status code.
    template <class Reply>
    void dispatch(const push_spec& p, Reply reply) {
        double t = p.timeout_ms > 0 ? p.timeout_ms
                                    : node_.config().push_timeout_s * 1000;
        auto timeout = std::chrono::milliseconds(static_cast<long>(t));
        auto done = [node = &node_, home = &thread_, device = p.device,
                     reply](push_outcome o, std::uint64_t id,
                            std::string_view reason) mutable {
            home->stats.count(o);
            reply(result_json(node->node_id(), o, device, id, reason),
                  status_code(o));
        };
        if (node_.deliver_local(thread_, p.device, p.data, p.from, p.want_ack,
                                timeout, std::move(done))) {
            return;
        }
        auto* f = node_.fleet();
        if (!f) {
            thread_.stats.count(push_outcome::not_connected);
            return reply(result_json(node_.node_id(),
                                     push_outcome::not_connected, p.device, 0,
                                     "device is not connected"),
                         404);
        }
        peer::request req;
        req.device = p.device;
        req.data = std::string(p.data);
        req.from = std::string(p.from);
        req.want_ack = p.want_ack;
        req.timeout_ms = static_cast<std::uint32_t>(timeout.count());
        // The peer answers within the push timeout; the link gets a little
        // more before it answers 504 itself.
        f->push(thread_, std::move(req), timeout + std::chrono::seconds(1),
                [node = &node_, home = &thread_, device = p.device,
                 reply](peer::reply r) mutable {
                    home->stats.count(outcome_of(r.code));
                    reply(remote_result_json(r, node->node_id(), device),
                          r.code);
                });
    }

    // POST /v1/push/batch: {"pushes":[push, ...]} (or a bare array); one
    // result per push, in order. Invalid items get their own 400 result.
    void push_batch(const std::string& body) {
        if (auto why = validate_json(body); !why.empty()) return bad_push(why);
        od::document doc;
        auto& json = thread_.json_buffer;
        if (thread_.ondemand.iterate(json.data(), json.size(), json.capacity())
                .get(doc)) {
            return bad_push("body is not valid JSON");
        }
        od::array items;
        od::json_type type;
        if (doc.type().get(type)) return bad_push("body is not valid JSON");
        if (type == od::json_type::array) {
            if (doc.get_array().get(items)) return bad_push("bad array");
        } else if (type == od::json_type::object) {
            if (doc["pushes"].get_array().get(items)) {
                return bad_push("body needs an array 'pushes'");
            }
        } else {
            return bad_push("body must be {\"pushes\": [...]}");
        }

        struct batch {
            std::vector<std::string> results;
            std::size_t remaining = 1;  // released after dispatching all
        };
        auto b = std::make_shared<batch>();
        auto finish_one = [self = shared_from_this(), b](std::size_t i,
                                                         std::string r) {
            b->results[i] = std::move(r);
            if (--b->remaining == 0) self->respond_batch(*b);
        };
        std::size_t i = 0;
        for (auto item : items) {
            b->results.emplace_back();
            ++b->remaining;
            od::object obj;
            push_spec p;
            bool too_large = false;
            std::string why;
            if (item.get_object().get(obj)) {
                why = "each push must be a JSON object";
            } else {
                why = read_push(obj, p, node_.config().max_push_bytes,
                                too_large);
            }
            if (!why.empty()) {
                auto o = too_large ? push_outcome::too_large
                                   : push_outcome::bad_request;
                thread_.stats.count(o);
                thread_.stats.count(reject::bad_push);
                finish_one(i++, result_json(node_.node_id(), o, p.device, 0, why));
                continue;
            }
            dispatch(p, [finish_one, i](std::string r, int) {
                finish_one(i, std::move(r));
            });
            ++i;
        }
        if (--b->remaining == 0) respond_batch(*b);
    }

    template <class Batch>
    void respond_batch(Batch& b) {
        std::string s = R"({"node":)";
        json::append_string(s, node_.node_id());
        s += R"(,"results":[)";
        for (std::size_t i = 0; i < b.results.size(); ++i) {
            if (i) s += ',';
            s += b.results[i];
        }
        s += "]}";
        respond(http::status::ok, s);
    }

    // POST /v1/drain {"over_s":S}: spreads the devices' reconnects over S
    // seconds (drain_s when the body is empty or has no over_s), then the
    // node stops itself. 202 with the plan; 409 when already draining.
    void drain(const std::string& body) {
        double over_s = node_.config().drain_s;
        if (body.find_first_not_of(" \t\r\n") != std::string::npos) {
            if (auto why = validate_json(body); !why.empty()) {
                return respond(http::status::bad_request,
                               R"({"error":"body is not valid JSON"})");
            }
            simdjson::dom::element doc;
            auto padded = thread_.padded(body);
            if (thread_.dom.parse(padded.data(), padded.size(), false)
                    .get(doc) ||
                !doc.is_object()) {
                return respond(http::status::bad_request,
                               R"({"error":"body must be a JSON object"})");
            }
            simdjson::dom::element v;
            if (!doc["over_s"].get(v)) {
                double d = -1;
                if (v.is_number()) d = double(v);
                if (!(d >= 0 && d <= 86400)) {
                    return respond(
                        http::status::bad_request,
                        R"({"error":"over_s must be a number from 0 to 86400"})");
                }
                over_s = d;
            }
        }
        auto devices = node_.table().size();
        if (!node_.drain(over_s)) {
            return respond(http::status::conflict,
                           R"({"error":"node is already draining or stopping"})");
        }
        std::string b = R"({"status":"draining","node":)";
        json::append_string(b, node_.node_id());
        b += R"(,"over_s":)";
        json::append_number(b, over_s);
        b += R"(,"deadline_s":)";
        json::append_number(b, over_s + node_.config().reconnect_grace_s);
        b += ",\"devices\":" + std::to_string(devices) + '}';
        respond(http::status::accepted, b);
    }

    void device_info(const std::string& device) {
        auto s = node_.table().find(device);
        std::string b = R"({"device":)";
        json::append_string(b, device);
        b += R"(,"node":)";
        json::append_string(b, node_.node_id());
        if (!s) {
            b += R"(,"connected":false})";
            return respond(http::status::not_found, b);
        }
        // Identity fields never change after a session is made.
        b += R"(,"connected":true,"account":)";
        json::append_string(b, s->account());
        b += ",\"connection\":" + std::to_string(s->id());
        b += ",\"connected_at\":" + std::to_string(s->connected_at());
        b += '}';
        respond(http::status::ok, b);
    }

    // Writes a JSON response, then reads the next request (or closes).
    void respond(http::status status, std::string body,
                 std::string_view content_type = "application/json") {
        res_.emplace();
        res_->result(status);
        res_->version(11);
        res_->set(http::field::content_type, content_type);
        if (!res_extra_allow_.empty()) {
            res_->set(http::field::allow, res_extra_allow_);
            res_extra_allow_ = {};
        }
        res_->keep_alive(keep_alive_);
        res_->body() = std::move(body);
        if (res_->body().empty() || res_->body().back() != '\n') {
            res_->body() += '\n';
        }
        res_->prepare_payload();
        http::async_write(stream_, *res_,
                          [self = shared_from_this()](error_code ec,
                                                      std::size_t) {
                              self->res_.reset();
                              if (ec || !self->keep_alive_) {
                                  return self->close();
                              }
                              self->do_read();
                          });
    }

    void close() {
        error_code ec;
        stream_.socket().shutdown(net::ip::tcp::socket::shutdown_send, ec);
    }

    node_impl& node_;
    io_thread& thread_;
    beast::tcp_stream stream_;
    beast::flat_buffer buffer_;
    std::optional<http::request_parser<http::string_body>> parser_;
    std::optional<http::response<http::string_body>> res_;
    std::string_view res_extra_allow_;
    bool keep_alive_ = true;
};

}  // namespace

void start_http_session(node_impl& node, io_thread& thread,
                        net::ip::tcp::socket socket) {
    std::make_shared<http_session>(node, thread, std::move(socket))->run();
}

}  // namespace pushy
