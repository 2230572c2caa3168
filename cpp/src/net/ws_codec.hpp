// WebSocket (RFC 6455) framing for the server side, free of I/O.
//
// The node reads socket bytes into a per-thread buffer and feeds them to a
// ws_reader; the reader keeps only a few bytes of frame-header state between
// calls, and heap memory only while a message or a partial frame is being
// assembled, so an idle connection holds no read buffer. Encoding writes
// unmasked server frames.
//
// Thread safety: none; a reader belongs to one connection on one thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace pushy::ws {

// Close codes used by the node (RFC 6455 section 7.4.1, plus our own).
enum close_code : std::uint16_t {
    close_normal = 1000,
    close_going_away = 1001,
    close_protocol_error = 1002,
    close_invalid_payload = 1007,
    close_policy = 1008,
    close_too_big = 1009,
    close_server_error = 1011,
    close_try_again = 1013,
    close_superseded = 4001,
    close_token_expired = 4002,
    close_slow_consumer = 4003,
};

enum class opcode : std::uint8_t {
    continuation = 0x0,
    text = 0x1,
    binary = 0x2,
    close = 0x8,
    ping = 0x9,
    pong = 0xA,
};

// What the reader hands to its owner, one event per call of the callbacks.
struct reader_events {
    virtual ~reader_events() = default;

    // A complete text or binary message. `text` has been validated as
    // UTF-8 when `is_text`. The view is valid only during the call.
    virtual void on_message(std::string_view payload, bool is_text) = 0;

    // A ping; the owner answers with a pong carrying `payload`.
    virtual void on_ping(std::string_view payload) = 0;

    // A pong.
    virtual void on_pong(std::string_view payload) = 0;

    // A close frame from the peer. `code` is 1005 (no status) for an
    // empty close frame; `reason` is valid only during the call.
    virtual void on_close(std::uint16_t code, std::string_view reason) = 0;
};

// Incremental frame parser for client-to-server frames.
class ws_reader {
public:
    explicit ws_reader(std::size_t max_message_bytes);
    ~ws_reader();
    ws_reader(ws_reader&&) noexcept;
    ws_reader& operator=(ws_reader&&) noexcept;

    // Feed bytes just read from the socket. Events are delivered through
    // `ev` as frames complete. Returns 0 while the stream is well formed;
    // otherwise the close code the connection must be closed with (1002
    // protocol error, 1007 invalid UTF-8, 1009 too big); after an error the
    // reader accepts no more input. Stops after a close frame: bytes after
    // it are ignored.
    std::uint16_t feed(const char* data, std::size_t size, reader_events& ev);

    // True when no partial frame or message is held (nothing on the heap).
    bool idle() const noexcept;

    // Heap bytes held by the reader now.
    std::size_t held_bytes() const noexcept;

private:
    struct state;

    std::uint16_t fail(std::uint16_t code) noexcept;
    state& ensure_state();
    void release_if_idle() noexcept;
    std::uint16_t deliver_control(std::uint8_t op, std::string_view payload,
                                  reader_events& ev);

    std::unique_ptr<state> partial_;  // null while idle
    std::size_t max_message_bytes_;
    std::uint8_t flags_ = 0;  // closed / error bits, see ws_codec.cpp
};

// Appends one unmasked, unfragmented server frame to `out`.
void encode_frame(std::string& out, opcode op, std::string_view payload);

// Appends a close frame with `code` and a reason truncated to fit 125 bytes.
void encode_close(std::string& out, std::uint16_t code,
                  std::string_view reason = {});

// Size of the header encode_frame writes for a payload of `size` bytes.
std::size_t frame_header_size(std::size_t size) noexcept;

// Writes the header of an unmasked final frame into `out` (at least 10
// bytes) and returns its length; the payload follows it on the wire.
std::size_t write_frame_header(char* out, opcode op, std::size_t size) noexcept;

// True when `key` (Sec-WebSocket-Key) is base64 that decodes to 16 bytes.
bool valid_client_key(std::string_view key) noexcept;

// Sec-WebSocket-Accept for a client key (RFC 6455 section 4.2.2).
std::string accept_key(std::string_view key);

// True when `code` may be sent in a close frame (RFC 6455 section 7.4).
bool valid_close_code(std::uint16_t code) noexcept;

}  // namespace pushy::ws
