// One io thread of a node: its own io_context, timer wheel, counters and
// scratch buffers. Every connection lives on exactly one io thread, so its
// state needs no locks; other threads reach it by posting to `ioc`.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <simdjson.h>

#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/stats.hpp"
#include "core/timer_wheel.hpp"
#include "pushy/config.hpp"

namespace pushy {

struct io_thread {
    boost::asio::io_context ioc{1};
    timer_wheel wheel;
    boost::asio::steady_timer ticker{ioc};
    counters stats;

    // Socket reads land here; a connection keeps only what a partial frame
    // needs (see ws_reader), so idle connections hold no read buffer.
    std::vector<char> read_buffer = std::vector<char>(64 * 1024);

    // Device and service JSON is parsed here: the DOM parser validates a
    // whole document, the on-demand one finds the exact text of a value
    // (payloads pass through as validated raw JSON). `json_buffer` is the
    // padded copy both need.
    simdjson::dom::parser dom;
    simdjson::ondemand::parser ondemand;
    std::string json_buffer;

    // Copies `text` into json_buffer with simdjson's padding after it.
    std::string_view padded(std::string_view text);

    // Frames to a device are built here and sent at once; a connection
    // keeps this buffer (and the thread takes a new one) only while the
    // kernel will not take all of it, so idle connections hold no write
    // buffer either.
    std::string write_buffer;

    std::thread thread;
    unsigned index = 0;
    unsigned thread_count = 1;

    // This thread's share of the node's accept rate: a token bucket of
    // accept_rate / threads per second (accept_burst, or one second's
    // worth, split the same way). Takes a token; false when none is left.
    bool take_accept_token(const node_config& cfg);
    double accept_tokens = -1;  // negative: not used yet (full)
    std::chrono::steady_clock::time_point accept_filled;

    // Starts the wheel's ticker; call on the thread before run().
    void start_ticker();
};

}  // namespace pushy
