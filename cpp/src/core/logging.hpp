// The node's log: spdlog underneath, bridged to a handler (Python's
// `logging` in the module) when one is set, stderr otherwise.
//
// Levels follow the house table: error for bugs, warn for server-imposed
// disconnects and outages, info for start/stop/listen addresses, debug for
// the connection lifecycle, trace for frames. Payloads and tokens are never
// logged.
#pragma once

#include <functional>
#include <memory>
#include <string_view>

#include <spdlog/spdlog.h>

namespace pushy::log {

// Receives (level as Python's logging number, logger name, message). It is
// called from io threads and must be thread-safe.
using handler = std::function<void(int, std::string_view, std::string_view)>;

// Installs `h` (null restores stderr). Not thread-safe against logging in
// flight: set it before starting nodes.
void set_handler(handler h);

// Sets the minimum level, as a Python logging number (5 trace ... 50).
void set_level(int python_level);

// The shared logger.
spdlog::logger& get();

}  // namespace pushy::log

#define PUSHY_LOG(lvl, ...)                                      \
    do {                                                         \
        auto& pushy_logger_ = ::pushy::log::get();               \
        if (pushy_logger_.should_log(lvl))                       \
            pushy_logger_.log(lvl, __VA_ARGS__);                 \
    } while (0)
#define PUSHY_TRACE(...) PUSHY_LOG(spdlog::level::trace, __VA_ARGS__)
#define PUSHY_DEBUG(...) PUSHY_LOG(spdlog::level::debug, __VA_ARGS__)
#define PUSHY_INFO(...) PUSHY_LOG(spdlog::level::info, __VA_ARGS__)
#define PUSHY_WARN(...) PUSHY_LOG(spdlog::level::warn, __VA_ARGS__)
#define PUSHY_ERROR(...) PUSHY_LOG(spdlog::level::err, __VA_ARGS__)
