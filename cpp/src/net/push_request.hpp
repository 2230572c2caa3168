// A push on its way to one connection, and how its outcome gets back.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "core/stats.hpp"

namespace pushy {

struct io_thread;

// The outcome of a push delivered on this node, with the push id (0 when
// none was assigned) and a reason valid only during the call.
using local_push_done =
    std::function<void(push_outcome, std::uint64_t id, std::string_view)>;

// Where a push's outcome goes: `fn` runs on io thread `home`, with `id`.
// The connection's thread calls it exactly once; it posts the call to
// `home` (no wrapper of its own: one allocation less per push).
struct push_done {
    io_thread* home = nullptr;
    std::uint64_t id = 0;
    local_push_done fn;

    void operator()(push_outcome o, std::string_view reason);
};

struct push_request {
    std::uint64_t id = 0;
    // A queued message's id: the device acks it by this string instead of
    // the numeric id. Empty for other pushes.
    std::string msg_id;
    std::string frame;  // the JSON text of the push frame, ready to send
    bool want_ack = false;
    std::chrono::milliseconds timeout{5000};
    push_done done;
};

}  // namespace pushy
