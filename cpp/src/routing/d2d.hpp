// Device-to-device messages (DESIGN section 3): what a node carries from a
// device to another device of the same account (or one the sender is
// allowed to reach), on this node or on another.
#pragma once

#include <functional>
#include <string>
#include <string_view>

namespace pushy {

struct d2d_message {
    std::string msg_id;   // the sender's id, as JSON text (a string)
    std::string from;     // sending device
    std::string account;  // the sender's account
    std::string to;       // target device
    std::string data;     // validated JSON text, passed through
};

// The answer to the sender: a status code (200, 403, 404, 503, 504...)
// and, for a failure, a reason. Runs on the sender's io thread.
using d2d_done = std::function<void(int code, std::string_view reason)>;

// True when a sender of account `a` may reach a target of account `b`
// without an allow-list: the same account. A token without `acc` (an empty
// account) belongs to no account, so it shares none.
inline bool same_account(std::string_view a, std::string_view b) noexcept {
    return !a.empty() && a == b;
}

// The frame the target receives: {"t":"d2d","id":M,"from":F,"data":D}.
std::string d2d_frame(const d2d_message& m);

}  // namespace pushy
