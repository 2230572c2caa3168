// One device's WebSocket connection, after the upgrade.
//
// Memory is the design constraint: an idle session holds its socket, the
// device identity, a 32-byte timer-wheel entry and a few flags; no read
// buffer (it waits for readability and reads into the thread's buffer), no
// write buffer (one is kept only while bytes wait for the kernel) and no
// Asio timer (the thread's wheel drives heartbeats and deadlines).
//
// Threading: every member function runs on the session's io thread, except
// executor(), which any thread may use to post work to it.
#pragma once

#include <boost/asio/ip/tcp.hpp>

#include <simdjson.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "auth/jwt_verifier.hpp"
#include "core/timer_wheel.hpp"
#include "net/push_request.hpp"
#include "net/tls.hpp"
#include "net/ws_codec.hpp"
#include "routing/d2d.hpp"

namespace pushy {

class node_impl;
struct io_thread;

class session : public std::enable_shared_from_this<session>,
                public timer_entry,
                private ws::reader_events {
public:
    using tcp = boost::asio::ip::tcp;
    using clock = std::chrono::steady_clock;

    // `tls` (owned from now on) is the connection's TLS state, or null
    // for a plain one.
    session(node_impl& node, io_thread& thread, tcp::socket socket,
            auth::claims claims, tls::SSL* tls = nullptr);
    ~session() override;

    // Registers the device (superseding an older connection), sends the
    // upgrade's `response` (the 101, empty when already sent) and hello in
    // one write, and starts reading. `leftover` holds bytes read past the
    // upgrade request: the first frames, if the client was quick. `meta`
    // (the token's meta JSON text, empty for none) goes into the connected
    // event of a fleet; the session does not keep it.
    void start(std::string_view leftover, std::string meta = {},
               std::string response = {});

    // Sends a push and reports its outcome through req.done.
    void deliver(push_request req);

    // Starts the closing handshake with `code`; the device is forgotten at
    // once. No-op if already closing.
    void close(std::uint16_t code, std::string_view reason);

    // The node drains: the reconnect message goes out at `at` (or at the
    // end of the lifetime, if sooner), with reason "drain".
    void drain_at(clock::time_point at);

    boost::asio::io_context& context() noexcept;
    const std::string& device() const noexcept { return device_; }
    const std::string& account() const noexcept { return account_; }
    std::uint64_t id() const noexcept { return id_; }
    std::int64_t connected_at() const noexcept { return connected_at_; }

private:
    struct pending_ack;

    // The rest of start(), once the device is registered.
    void begin(std::string_view leftover, std::string_view response);
    // A d2d message from the device (`text` is the whole message).
    void handle_d2d(std::string_view text, simdjson::dom::object obj,
                    const std::string& id_json);
    // A send message from the device, upstream to a service.
    void handle_send(std::string_view text, simdjson::dom::object obj,
                     const std::string& id_json);
    // A subscribe or unsubscribe message (`kind` is its `t`).
    void handle_subscription(std::string_view kind, simdjson::dom::object obj,
                             const std::string& id_json);
    // Counts and writes the status answering an upstream message, now or
    // (upstream_answer) when the fleet has the outcome.
    void upstream_status(const std::string& id_json, int code,
                         std::string_view why);
    d2d_done upstream_answer(const std::string& id_json);
    // Finds the exact text of the message's `data` (`text` is the whole
    // message); false when it has none.
    bool data_text(std::string_view text, std::string_view& data);
    // Takes a token from the d2d bucket (d2d and upstream messages share
    // it); false when it is empty.
    bool take_d2d_token();
    struct write_waiter {
        std::uint64_t end;  // byte count at which the frame is written
        clock::time_point deadline;
        push_request req;
    };
    enum class state : std::uint8_t { open, closing, closed };

    // reader_events
    void on_message(std::string_view payload, bool is_text) override;
    void on_ping(std::string_view payload) override;
    void on_pong(std::string_view payload) override;
    void on_close(std::uint16_t code, std::string_view reason) override;

    void do_wait_read();
    void read_soon();
    void on_readable(boost::system::error_code ec);
    void do_wait_write();
    void on_writable(boost::system::error_code ec);

    void handle_text(std::string_view text);
    void send_status(std::string_view id_json, int code,
                     std::string_view reason);
    void send_frame(ws::opcode op, std::string_view payload);
    void flush();
    void borrow_buffer();
    void return_buffer();
    void complete_writes();
    void settle_ack(pending_ack* p, push_outcome o, std::string_view why);

    void schedule_timer();
    void send_reconnect(clock::time_point now);
    static void on_timer(timer_entry* e);
    void on_deadline();

    // Unregisters and fails everything pending with `o`.
    void forget(push_outcome o, std::string_view why);
    // Closes the socket now; the session ends when its handlers return.
    void finish();
    // Discards unstarted frames, answers waiting pushes `o`, closes 4003.
    void drop_slow_consumer(push_outcome o, std::string_view why);

    node_impl& node_;
    io_thread& thread_;
    tcp::socket socket_;
    tls::SSL* tls_;  // null for a plain connection
    ws::ws_reader reader_;
    std::string device_;
    std::string account_;
    std::uint64_t id_;
    std::int64_t connected_at_;  // seconds since the epoch

    // Deadlines (the earliest is on the wheel).
    clock::time_point next_ping_;
    clock::time_point pong_deadline_;
    clock::time_point token_expiry_;
    clock::time_point lifetime_end_;
    clock::time_point close_deadline_;

    // Outbound bytes not yet taken by the kernel, from out_offset_.
    std::string out_;
    std::size_t out_offset_ = 0;
    std::uint64_t written_ = 0;
    std::uint64_t queued_ = 0;
    std::vector<write_waiter> waiters_;
    std::vector<std::unique_ptr<pending_ack>> acks_;

    // Device-to-device token bucket: tokens left (negative: not used yet,
    // so full) and when it was last filled, in ms of the steady clock.
    float d2d_tokens_ = -1;
    std::uint32_t d2d_filled_ms_ = 0;

    state state_ = state::open;
    bool reading_ = false;
    bool writing_ = false;
    bool awaiting_pong_ = false;
    bool has_expiry_ = false;
    bool reconnect_sent_ = false;
    bool draining_ = false;
    bool registered_ = false;
    bool started_ = false;
    // A TLS read that must write first (a key update while the kernel's
    // buffer is full): reading resumes once the socket is writable.
    bool read_wants_write_ = false;
    // Through TLS: the bytes offered to the write that the kernel did not
    // take whole. OpenSSL has framed them into a record already, so they
    // must be offered again as they are (see drop_slow_consumer).
    std::uint32_t tls_offered_ = 0;
};

}  // namespace pushy
