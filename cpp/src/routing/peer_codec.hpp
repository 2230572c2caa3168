// Frames of the peer link: the binary protocol between nodes, and from push
// clients to nodes (DESIGN section 2).
//
// A frame is a 4-byte big-endian length and a msgpack array:
//   request: [1, id, kind, device, data, ack, timeout_ms, from, conn,
//             account, msg_id, deadline_ms]
// (deadline_ms may be absent: a request of an older sender has none).
//   reply:   [2, id, code, status, node, push_id, reason]
// `data` is the push's JSON text, passed through unchanged. Requests are
// pipelined; replies carry the request id and may come in any order.
// Free of I/O.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace pushy::peer {

// Largest frame accepted; a bigger length prefix ends the link.
constexpr std::size_t max_frame_bytes = 16u << 20;

enum class kind : std::uint8_t {
    push = 1,  // deliver a push to a device connected to the receiver
    kick = 2,  // close the device's connection `conn` with 4001
    d2d = 3,   // a device-to-device message for `device`, from `from`
    event = 4, // an event frame (`data`, sent as it is) for `device`'s
               // connection `conn` (0: whichever is connected)
};

struct request {
    std::uint64_t id = 0;
    kind what = kind::push;
    std::string device;
    std::string data;
    bool want_ack = false;
    std::uint32_t timeout_ms = 0;
    std::string from;      // push: service name; d2d: sending device
    std::uint64_t conn = 0;
    std::string account;   // d2d: the sender's account
    // d2d: the sender's message id as JSON text; push: a queued message's
    // id as plain text (the device's frame carries it and the device acks
    // it), or empty.
    std::string msg_id;
    // Wall-clock ms since the epoch after which the receiver must not
    // deliver (the sender has answered 504 by then); 0: none.
    std::uint64_t deadline_ms = 0;
};

// The wall clock in ms since the epoch, as deadlines use it.
std::uint64_t wall_ms() noexcept;

struct reply {
    std::uint64_t id = 0;
    std::uint16_t code = 0;
    std::string status;
    std::string node;
    std::uint64_t push_id = 0;
    std::string reason;
};

// Appends one frame to `out`.
void encode(std::string& out, const request& r);
void encode(std::string& out, const reply& r);

// Splits a byte stream into frames. feed() the bytes read, then call next()
// until it returns `none`.
class frame_reader {
public:
    enum class result { none, request, reply, error };

    void feed(const char* data, std::size_t n) { buf_.append(data, n); }

    // Decodes the next whole frame into `req` or `rep`. `error` means the
    // stream is corrupt (the link must be closed); `error_text` says why.
    result next(request& req, reply& rep);

    const std::string& error_text() const noexcept { return error_; }

private:
    std::string buf_;
    std::size_t pos_ = 0;
    std::string error_;
};

}  // namespace pushy::peer
