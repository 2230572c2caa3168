// pushy._core: the engine's Python bindings. No logic lives here: each
// binding converts arguments, releases the GIL around blocking C++ and maps
// C++ exceptions to pushy's Python ones through one table (see
// translate_exceptions below).
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "core/logging.hpp"
#include "pushy/config.hpp"
#include "pushy/node.hpp"
#include "pushy/processor.hpp"
#include "pushy/push_client.hpp"

namespace py = pybind11;

namespace {

// C++ exception            -> Python exception
// pushy::config_error      -> pushy.errors.ConfigError
// std::invalid_argument    -> pushy.errors.ConfigError
// anything else            -> pybind11's defaults (RuntimeError, ...)
void translate_exceptions() {
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const pushy::config_error& e) {
            auto errors = py::module_::import("pushy.errors");
            PyErr_SetString(errors.attr("ConfigError").ptr(), e.what());
        } catch (const std::invalid_argument& e) {
            auto errors = py::module_::import("pushy.errors");
            PyErr_SetString(errors.attr("ConfigError").ptr(), e.what());
        }
    });
}

[[noreturn]] void bad_key(const std::string& key, const char* expected) {
    throw pushy::config_error("config key '" + key + "' must be " + expected);
}

template <class T>
T as(const std::string& key, py::handle v, const char* expected) {
    try {
        return v.cast<T>();
    } catch (const py::cast_error&) {
        bad_key(key, expected);
    }
}

// Builds a node_config from a dict of NodeConfig field names.
pushy::node_config config_from(const py::dict& d) {
    pushy::node_config c;
    for (auto [k, v] : d) {
        auto key = as<std::string>("?", k, "a string");
        if (v.is_none()) continue;
        auto str = [&](std::string& f) { f = as<std::string>(key, v, "a string"); };
        auto num = [&](double& f) { f = as<double>(key, v, "a number"); };
        auto size = [&](std::size_t& f) {
            auto n = as<long long>(key, v, "an integer");
            if (n < 0) bad_key(key, "a non-negative integer");
            f = static_cast<std::size_t>(n);
        };
        auto port = [&](std::uint16_t& f) {
            auto n = as<long long>(key, v, "an integer");
            if (n < 0 || n > 65535) bad_key(key, "a port number (0-65535)");
            f = static_cast<std::uint16_t>(n);
        };
        if (key == "host") str(c.host);
        else if (key == "port") port(c.port);
        else if (key == "push_host") str(c.push_host);
        else if (key == "push_port") port(c.push_port);
        else if (key == "secret") str(c.secret);
        else if (key == "public_key") str(c.public_key);
        else if (key == "algorithm") str(c.algorithm);
        else if (key == "audience") str(c.audience);
        else if (key == "node_id") str(c.node_id);
        else if (key == "tls_cert") str(c.tls_cert);
        else if (key == "tls_key") str(c.tls_key);
        else if (key == "tls_handshake_timeout_s") num(c.tls_handshake_timeout_s);
        else if (key == "redis") str(c.redis);
        else if (key == "redis_prefix") str(c.redis_prefix);
        else if (key == "peer_host") str(c.peer_host);
        else if (key == "peer_port") port(c.peer_port);
        else if (key == "registry_ttl_s") num(c.registry_ttl_s);
        else if (key == "threads") {
            std::size_t n;
            size(n);
            c.threads = static_cast<unsigned>(n);
        } else if (key == "heartbeat_s") num(c.heartbeat_s);
        else if (key == "pong_timeout_s") num(c.pong_timeout_s);
        else if (key == "lifetime_s") num(c.lifetime_s);
        else if (key == "upgrade_timeout_s") num(c.upgrade_timeout_s);
        else if (key == "close_timeout_s") num(c.close_timeout_s);
        else if (key == "push_timeout_s") num(c.push_timeout_s);
        else if (key == "d2d_rate") num(c.d2d_rate);
        else if (key == "route_cache_ttl_s") num(c.route_cache_ttl_s);
        else if (key == "d2d_burst") size(c.d2d_burst);
        else if (key == "max_d2d_bytes") size(c.max_d2d_bytes);
        else if (key == "events_maxlen") size(c.events_maxlen);
        else if (key == "accept_rate") num(c.accept_rate);
        else if (key == "accept_burst") size(c.accept_burst);
        else if (key == "max_outbound_bytes") size(c.max_outbound_bytes);
        else if (key == "reconnect_grace_s") num(c.reconnect_grace_s);
        else if (key == "drain_s") num(c.drain_s);
        else if (key == "max_message_bytes") size(c.max_message_bytes);
        else if (key == "max_push_bytes") size(c.max_push_bytes);
        else if (key == "max_header_bytes") size(c.max_header_bytes);
        else if (key == "max_headers") size(c.max_headers);
        else if (key == "max_connections") size(c.max_connections);
        else if (key == "max_pending_upgrades") size(c.max_pending_upgrades);
        else if (key == "allowed_origins") {
            c.allowed_origins = as<std::vector<std::string>>(
                key, v, "a list of strings");
        } else if (key == "deflate") {
            c.deflate = as<bool>(key, v, "a boolean");
        } else if (key == "reuse_port") {
            c.reuse_port = as<bool>(key, v, "a boolean");
        } else {
            throw pushy::config_error("unknown config key '" + key + "'");
        }
    }
    return c;
}

// A C++ completion that calls the Python `callback` with `convert(result)`,
// on whichever thread completes it: it takes the GIL, reports an exception
// of the callback as unraisable (`what`), and drops the callback with the
// GIL held.
template <class Result, class Convert>
std::function<void(Result)> python_callback(py::function callback,
                                            Convert convert,
                                            const char* what) {
    auto keep = std::make_shared<py::function>(std::move(callback));
    return [keep, convert, what](Result r) {
        py::gil_scoped_acquire gil;
        try {
            (*keep)(convert(r));
        } catch (py::error_already_set& e) {
            e.discard_as_unraisable(what);
        }
        py::function gone = std::move(*keep);
    };
}

// Builds a processor_config from a dict of MessageProcessor field names.
pushy::processor_config processor_config_from(const py::dict& d) {
    pushy::processor_config c;
    for (auto [k, v] : d) {
        auto key = as<std::string>("?", k, "a string");
        if (v.is_none()) continue;
        auto str = [&](std::string& f) { f = as<std::string>(key, v, "a string"); };
        auto num = [&](double& f) { f = as<double>(key, v, "a number"); };
        auto count = [&](unsigned& f) {
            auto n = as<long long>(key, v, "an integer");
            if (n < 0 || n > 0xffffffffLL) bad_key(key, "a non-negative integer");
            f = static_cast<unsigned>(n);
        };
        if (key == "redis") str(c.redis);
        else if (key == "prefix") str(c.prefix);
        else if (key == "group") str(c.group);
        else if (key == "consumer") str(c.consumer);
        else if (key == "shards") count(c.shards);
        else if (key == "batch") count(c.batch);
        else if (key == "max_in_flight") count(c.max_in_flight);
        else if (key == "max_waiting") count(c.max_waiting);
        else if (key == "claim_idle_s") num(c.claim_idle_s);
        else if (key == "retry_min_s") num(c.retry_min_s);
        else if (key == "retry_max_s") num(c.retry_max_s);
        else if (key == "push_timeout_s") num(c.push_timeout_s);
        else if (key == "ack_timeout_s") num(c.ack_timeout_s);
        else if (key == "route_cache_ttl_s") num(c.route_cache_ttl_s);
        else if (key == "dead_maxlen") {
            unsigned n;
            count(n);
            c.dead_maxlen = n;
        } else {
            throw pushy::config_error("unknown processor option '" + key + "'");
        }
    }
    return c;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
    m.doc() = "Pushy's C++ engine (private; use the pushy package).";
    translate_exceptions();

    py::class_<pushy::node>(m, "Node", "A node: device WebSocket server "
                                       "and internal push API.")
        .def(py::init([](const py::dict& cfg) {
                 return std::make_unique<pushy::node>(config_from(cfg));
             }),
             py::arg("config"),
             "Makes a node from a dict of NodeConfig fields (not started).")
        .def("start", &pushy::node::start,
             py::call_guard<py::gil_scoped_release>(),
             "Binds the ports and starts the io threads. Raises ConfigError.")
        .def("stop", &pushy::node::stop,
             py::call_guard<py::gil_scoped_release>(),
             "Closes every device with 1001 and stops. Idempotent.")
        .def("drain", &pushy::node::drain, py::arg("over_s"),
             "Asks every device to reconnect, spread over over_s seconds, "
             "refuses new ones, and stops once empty (or at over_s + "
             "reconnect_grace_s). False when not running or already "
             "draining.")
        .def_property_readonly("draining", &pushy::node::draining)
        .def("stats_json", &pushy::node::stats_json,
             py::call_guard<py::gil_scoped_release>(),
             "The GET /v1/stats document as a JSON string.")
        .def_property_readonly("running", &pushy::node::running)
        .def_property_readonly("port", &pushy::node::port)
        .def_property_readonly("push_port", &pushy::node::push_port)
        .def_property_readonly("peer_port", &pushy::node::peer_port)
        .def_property_readonly("node_id", &pushy::node::node_id)
        .def_property_readonly("connections", &pushy::node::connections);

    // A result crosses into Python as a plain tuple:
    // (code, status, node, id, reason, latency_s).
    using result_tuple = std::tuple<int, std::string, std::string,
                                    std::uint64_t, std::string, double>;
    auto to_tuple = [](const pushy::push_result& r) {
        return result_tuple{r.code, r.status, r.node, r.id, r.reason,
                            r.latency_s};
    };
    auto spec = [](std::string device, std::string data, bool ack,
                   double timeout, std::string from) {
        return pushy::push_spec_in{std::move(device), std::move(data), ack,
                                   timeout, std::move(from)};
    };
    using spec_tuple =
        std::tuple<std::string, std::string, bool, double, std::string>;
    using enqueue_tuple = std::tuple<std::string, std::string, std::string,
                                     double, bool, std::string, unsigned>;
    using enqueued_tuple = std::tuple<int, std::string, std::string,
                                      std::string, std::string>;
    auto to_enqueued = [](const pushy::enqueue_result& r) {
        return enqueued_tuple{r.code, r.status, r.id, r.entry, r.reason};
    };

    py::class_<pushy::push_client>(
        m, "PushClient",
        "Direct push through the Redis registry and peer links.")
        .def(py::init<const std::string&, const std::string&, double>(),
             py::arg("redis"), py::arg("prefix"), py::arg("timeout"),
             py::call_guard<py::gil_scoped_release>(),
             "Connects to Redis. Raises ConfigError for a bad URL or "
             "refused credentials.")
        .def(
            "push",
            [to_tuple, spec](pushy::push_client& c, std::string device,
                             std::string data, bool ack, double timeout,
                             std::string from) {
                pushy::push_result r;
                {
                    py::gil_scoped_release nogil;
                    r = c.push(spec(std::move(device), std::move(data), ack,
                                    timeout, std::move(from)));
                }
                return to_tuple(r);
            },
            py::arg("device"), py::arg("data"), py::arg("ack"),
            py::arg("timeout"), py::arg("sender"),
            "Pushes one message (data is JSON text) and waits for the "
            "result tuple.")
        .def(
            "push_async",
            [to_tuple, spec](pushy::push_client& c, std::string device,
                             std::string data, bool ack, double timeout,
                             std::string from, py::function callback) {
                auto done = python_callback<pushy::push_result>(
                    std::move(callback), to_tuple,
                    "pushy push callback");
                py::gil_scoped_release nogil;
                c.push_async(spec(std::move(device), std::move(data), ack,
                                  timeout, std::move(from)),
                             std::move(done));
            },
            py::arg("device"), py::arg("data"), py::arg("ack"),
            py::arg("timeout"), py::arg("sender"), py::arg("callback"),
            "Pushes one message; callback(result tuple) runs on the "
            "client's thread.")
        .def(
            "push_many",
            [to_tuple, spec](pushy::push_client& c,
                             std::vector<spec_tuple> items) {
                std::vector<pushy::push_spec_in> specs;
                specs.reserve(items.size());
                for (auto& [d, data, ack, t, from] : items) {
                    specs.push_back(spec(std::move(d), std::move(data), ack,
                                         t, std::move(from)));
                }
                std::vector<pushy::push_result> results;
                {
                    py::gil_scoped_release nogil;
                    results = c.push_many(std::move(specs));
                }
                std::vector<result_tuple> out;
                for (auto& r : results) out.push_back(to_tuple(r));
                return out;
            },
            py::arg("items"),
            "Pushes (device, data, ack, timeout, sender) tuples "
            "concurrently; one result tuple each, in order.")
        .def(
            "enqueue_many",
            [to_enqueued](pushy::push_client& c,
                          std::vector<enqueue_tuple> items) {
                std::vector<pushy::enqueue_spec> specs;
                specs.reserve(items.size());
                for (auto& [d, data, id, ttl, ack, from, shards] : items) {
                    specs.push_back(pushy::enqueue_spec{
                        std::move(d), std::move(data), std::move(id), ttl,
                        ack, std::move(from), shards});
                }
                std::vector<pushy::enqueue_result> results;
                {
                    py::gil_scoped_release nogil;
                    results = c.enqueue_many(std::move(specs));
                }
                std::vector<enqueued_tuple> out;
                for (auto& r : results) out.push_back(to_enqueued(r));
                return out;
            },
            py::arg("items"),
            "Queues (device, data, id, ttl, ack, sender, shards) tuples; "
            "one (code, status, id, entry, reason) tuple each, in order.")
        .def(
            "enqueue_async",
            [to_enqueued](pushy::push_client& c, enqueue_tuple item,
                          py::function callback) {
                auto done = python_callback<pushy::enqueue_result>(
                    std::move(callback), to_enqueued,
                    "pushy enqueue callback");
                auto& [d, data, id, ttl, ack, from, shards] = item;
                pushy::enqueue_spec spec{std::move(d), std::move(data),
                                         std::move(id), ttl, ack,
                                         std::move(from), shards};
                py::gil_scoped_release nogil;
                c.enqueue_async(std::move(spec), std::move(done));
            },
            py::arg("item"), py::arg("callback"),
            "Queues one message; callback(result tuple) runs on the "
            "client's thread.")
        .def_property_readonly("connected", &pushy::push_client::connected)
        .def_property_readonly("cache_hits", &pushy::push_client::cache_hits)
        .def_property_readonly("cache_misses",
                               &pushy::push_client::cache_misses)
        .def(
            "send_event",
            [to_tuple](pushy::push_client& c, std::string device,
                       std::string frame, std::uint64_t conn) {
                pushy::push_result r;
                {
                    py::gil_scoped_release nogil;
                    r = c.send_event(std::move(device), std::move(frame),
                                     conn);
                }
                return to_tuple(r);
            },
            py::arg("device"), py::arg("frame"), py::arg("conn"),
            "Sends an event frame (JSON text of an object with "
            "\"t\":\"event\") to the device's connection conn (0: any) "
            "and waits for the result tuple.")
        .def(
            "send_event_async",
            [to_tuple](pushy::push_client& c, std::string device,
                       std::string frame, std::uint64_t conn,
                       py::function callback) {
                auto done = python_callback<pushy::push_result>(
                    std::move(callback), to_tuple,
                    "pushy event callback");
                py::gil_scoped_release nogil;
                c.send_event_async(std::move(device), std::move(frame), conn,
                                   std::move(done));
            },
            py::arg("device"), py::arg("frame"), py::arg("conn"),
            py::arg("callback"),
            "Sends an event frame; callback(result tuple) runs on the "
            "client's thread.")
        .def("close", &pushy::push_client::close,
             py::call_guard<py::gil_scoped_release>(),
             "Stops the client; pending pushes are answered 503.");

    py::class_<pushy::message_processor>(
        m, "MessageProcessor",
        "Consumes the queue and delivers its messages by direct push.")
        .def(py::init([](const py::dict& cfg) {
                 return std::make_unique<pushy::message_processor>(
                     processor_config_from(cfg));
             }),
             py::arg("config"),
             "Checks the options and Redis credentials (ConfigError).")
        .def("start", &pushy::message_processor::start,
             py::call_guard<py::gil_scoped_release>())
        .def("stop", &pushy::message_processor::stop,
             py::call_guard<py::gil_scoped_release>(),
             "Stops; held messages stay pending in their streams.")
        .def_property_readonly("running", &pushy::message_processor::running)
        .def_property_readonly("consumer",
                               &pushy::message_processor::consumer)
        .def(
            "stats",
            [](const pushy::message_processor& p) {
                auto s = p.stats();
                py::dict d;
                d["read"] = s.read;
                d["claimed"] = s.claimed;
                d["attempts"] = s.attempts;
                d["delivered"] = s.delivered;
                d["retried"] = s.retried;
                d["expired"] = s.expired;
                d["undeliverable"] = s.undeliverable;
                d["malformed"] = s.malformed;
                d["redis_errors"] = s.redis_errors;
                d["in_flight"] = s.in_flight;
                d["waiting"] = s.waiting;
                d["redis_up"] = s.redis_up;
                return d;
            },
            "The processor's counters, as a dict.");

    m.def(
        "set_log_handler",
        [](py::object handler) {
            if (handler.is_none()) {
                pushy::log::set_handler(nullptr);
                return;
            }
            // The handler is called from io threads: take the GIL for each
            // record. It is kept alive for as long as it is installed.
            // At interpreter exit the handler is leaked rather than
            // released without a live interpreter.
            std::shared_ptr<py::object> keep(
                new py::object(std::move(handler)), [](py::object* o) {
                    if (!Py_IsInitialized()) return;
                    py::gil_scoped_acquire gil;
                    delete o;
                });
            pushy::log::set_handler(
                [keep](int level, std::string_view name,
                       std::string_view text) {
                    if (!Py_IsInitialized()) return;
                    py::gil_scoped_acquire gil;
                    try {
                        (*keep)(level, py::str(name.data(), name.size()),
                                py::str(text.data(), text.size()));
                    } catch (py::error_already_set& e) {
                        e.discard_as_unraisable("pushy log handler");
                    }
                });
        },
        py::arg("handler"),
        "Sends engine log records to handler(level, logger, message); "
        "None restores stderr. Set before starting nodes.");
    m.def("set_log_level", &pushy::log::set_level, py::arg("level"),
          "Sets the engine's minimum log level (a Python logging level).");
}
