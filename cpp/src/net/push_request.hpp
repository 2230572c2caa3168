// A push on its way to one connection, and how its outcome gets back.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "core/stats.hpp"

namespace pushy {

// Called exactly once with the outcome, on the io thread of the connection
// (or of the caller, when the device is not connected). `reason` is valid
// only during the call.
using push_done = std::function<void(push_outcome, std::string_view reason)>;

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
