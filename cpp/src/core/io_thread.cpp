#include "core/io_thread.hpp"

#include <algorithm>

#include <boost/asio/post.hpp>

namespace pushy {

// Advances the wheel every tick. A tick costs one timer wait per thread,
// however many connections the thread holds.
void io_thread::start_ticker() {
    ticker.expires_after(wheel.tick());
    ticker.async_wait([this](boost::system::error_code ec) {
        if (ec) return;
        wheel.advance(timer_wheel::clock::now());
        start_ticker();
    });
}

std::string_view io_thread::padded(std::string_view text) {
    json_buffer.reserve(text.size() + simdjson::SIMDJSON_PADDING);
    json_buffer.assign(text.data(), text.size());
    return json_buffer;
}

bool io_thread::take_accept_token(const node_config& cfg) {
    double share = static_cast<double>(thread_count);
    double rate = cfg.accept_rate / share;
    double burst = (cfg.accept_burst ? static_cast<double>(cfg.accept_burst)
                                     : cfg.accept_rate) /
                   share;
    burst = std::max(burst, 1.0);
    auto now = std::chrono::steady_clock::now();
    if (accept_tokens < 0) {
        accept_tokens = burst;
    } else {
        double elapsed =
            std::chrono::duration<double>(now - accept_filled).count();
        accept_tokens = std::min(burst, accept_tokens + elapsed * rate);
    }
    accept_filled = now;
    if (accept_tokens < 1) return false;
    accept_tokens -= 1;
    return true;
}

}  // namespace pushy

