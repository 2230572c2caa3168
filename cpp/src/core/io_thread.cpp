#include "core/io_thread.hpp"

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

}  // namespace pushy
