#include "core/logging.hpp"

#include <spdlog/details/null_mutex.h>
#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <mutex>

namespace pushy::log {

namespace {

// Python logging numbers for spdlog levels.
int python_level(spdlog::level::level_enum l) {
    switch (l) {
        case spdlog::level::trace: return 5;
        case spdlog::level::debug: return 10;
        case spdlog::level::info: return 20;
        case spdlog::level::warn: return 30;
        case spdlog::level::err: return 40;
        default: return 50;
    }
}

// A sink calling the handler. No sink mutex: the handler serialises itself
// (the Python bridge takes the GIL), and a mutex held while waiting for the
// GIL could deadlock against a Python thread that logs.
class handler_sink : public spdlog::sinks::base_sink<spdlog::details::null_mutex> {
public:
    explicit handler_sink(handler h) : h_(std::move(h)) {}

protected:
    void sink_it_(const spdlog::details::log_msg& msg) override {
        std::string_view name(msg.logger_name.data(), msg.logger_name.size());
        std::string_view text(msg.payload.data(), msg.payload.size());
        h_(python_level(msg.level), name, text);
    }
    void flush_() override {}

private:
    handler h_;
};

std::shared_ptr<spdlog::logger>& instance() {
    static std::shared_ptr<spdlog::logger> l = [] {
        auto sink = std::make_shared<spdlog::sinks::stderr_sink_mt>();
        auto lg = std::make_shared<spdlog::logger>("node", sink);
        lg->set_level(spdlog::level::info);
        lg->set_pattern("%Y-%m-%d %H:%M:%S.%e %l pushy.%n: %v");
        return lg;
    }();
    return l;
}

}  // namespace

void set_handler(handler h) {
    auto& lg = instance();
    auto level = lg->level();
    std::shared_ptr<spdlog::logger> next;
    if (h) {
        next = std::make_shared<spdlog::logger>(
            "node", std::make_shared<handler_sink>(std::move(h)));
    } else {
        next = std::make_shared<spdlog::logger>(
            "node", std::make_shared<spdlog::sinks::stderr_sink_mt>());
        next->set_pattern("%Y-%m-%d %H:%M:%S.%e %l pushy.%n: %v");
    }
    next->set_level(level);
    lg = std::move(next);
}

void set_level(int py) {
    spdlog::level::level_enum l = py <= 5    ? spdlog::level::trace
                                  : py <= 10 ? spdlog::level::debug
                                  : py <= 20 ? spdlog::level::info
                                  : py <= 30 ? spdlog::level::warn
                                  : py <= 40 ? spdlog::level::err
                                             : spdlog::level::critical;
    instance()->set_level(l);
}

spdlog::logger& get() { return *instance(); }

}  // namespace pushy::log
