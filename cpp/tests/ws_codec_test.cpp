// Unit tests of the WebSocket codec (net/ws_codec): frame parsing rules of
// RFC 6455, the memory behaviour of ws_reader, and frame encoding.
#include "net/ws_codec.hpp"

#include <doctest/doctest.h>
#include <simdjson.h>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace {

using namespace pushy::ws;

constexpr std::size_t default_max = 64 * 1024;

// One event seen by the recorder.
struct event {
    std::string kind;  // "message", "ping", "pong" or "close"
    std::string payload;
    bool is_text = false;
    std::uint16_t code = 0;

    bool operator==(const event&) const = default;
};

// Records every event; optionally notes whether the reader held heap state
// at the moment of each call.
struct recorder : reader_events {
    std::vector<event> events;
    const ws_reader* watched = nullptr;
    std::vector<bool> idle_during_call;

    // Notes the watched reader's idle state, when one is watched.
    void note() {
        if (watched) idle_during_call.push_back(watched->idle());
    }

    // Records a message.
    void on_message(std::string_view p, bool is_text) override {
        note();
        events.push_back({"message", std::string(p), is_text, 0});
    }

    // Records a ping.
    void on_ping(std::string_view p) override {
        note();
        events.push_back({"ping", std::string(p), false, 0});
    }

    // Records a pong.
    void on_pong(std::string_view p) override {
        note();
        events.push_back({"pong", std::string(p), false, 0});
    }

    // Records a close frame.
    void on_close(std::uint16_t code, std::string_view reason) override {
        note();
        events.push_back({"close", std::string(reason), false, code});
    }
};

// How client_frame builds a frame.
struct frame_opts {
    bool fin = true;
    bool masked = true;
    std::uint8_t rsv = 0;  // bits 0x70 of the first byte
    int len_form = 0;      // 0: minimal, 16: 16-bit, 64: 64-bit
    std::array<std::uint8_t, 4> key{0x37, 0xFA, 0x21, 0x3D};
};

// Builds a client frame with a raw opcode, masked unless told otherwise.
std::string client_frame(std::uint8_t op, std::string_view payload,
                         frame_opts o = {}) {
    std::string out;
    out.push_back(static_cast<char>((o.fin ? 0x80 : 0) | o.rsv | op));
    std::uint8_t mask_bit = o.masked ? 0x80 : 0;
    std::uint64_t len = payload.size();
    int form = o.len_form;
    if (form == 0) form = len <= 125 ? 7 : len <= 0xFFFF ? 16 : 64;
    if (form == 7) {
        out.push_back(static_cast<char>(mask_bit | len));
    } else if (form == 16) {
        out.push_back(static_cast<char>(mask_bit | 126));
        out.push_back(static_cast<char>(len >> 8));
        out.push_back(static_cast<char>(len & 0xFF));
    } else {
        out.push_back(static_cast<char>(mask_bit | 127));
        for (int i = 7; i >= 0; --i) {
            out.push_back(static_cast<char>((len >> (8 * i)) & 0xFF));
        }
    }
    if (o.masked) {
        for (auto b : o.key) out.push_back(static_cast<char>(b));
    }
    for (std::size_t i = 0; i < payload.size(); ++i) {
        auto b = static_cast<std::uint8_t>(payload[i]);
        if (o.masked) b ^= o.key[i % 4];
        out.push_back(static_cast<char>(b));
    }
    return out;
}

// Builds a masked client frame with a named opcode.
std::string client_frame(opcode op, std::string_view payload,
                         frame_opts o = {}) {
    return client_frame(static_cast<std::uint8_t>(op), payload, o);
}

// Builds a close payload: the code in network order and the reason.
std::string close_payload(std::uint16_t code, std::string_view reason = {}) {
    std::string p;
    p.push_back(static_cast<char>(code >> 8));
    p.push_back(static_cast<char>(code & 0xFF));
    p.append(reason);
    return p;
}

// A payload of `n` bytes that varies so masking mistakes show.
std::string pattern(std::size_t n) {
    std::string s(n, '\0');
    for (std::size_t i = 0; i < n; ++i) {
        s[i] = static_cast<char>('a' + (i * 7) % 26);
    }
    return s;
}

// Feeds all of `bytes` in one call.
std::uint16_t feed_all(ws_reader& r, std::string_view bytes, recorder& rec) {
    return r.feed(bytes.data(), bytes.size(), rec);
}

// Feeds `bytes` one byte per call; returns the first non-zero result.
std::uint16_t feed_bytewise(ws_reader& r, std::string_view bytes,
                            recorder& rec) {
    for (char c : bytes) {
        std::uint16_t code = r.feed(&c, 1, rec);
        if (code != 0) return code;
    }
    return 0;
}

// Feeds `bytes` in chunks of `chunk` bytes; returns the first non-zero
// result.
std::uint16_t feed_chunks(ws_reader& r, std::string_view bytes,
                          std::size_t chunk, recorder& rec) {
    for (std::size_t at = 0; at < bytes.size(); at += chunk) {
        auto part = bytes.substr(at, chunk);
        std::uint16_t code = r.feed(part.data(), part.size(), rec);
        if (code != 0) return code;
    }
    return 0;
}

// A message event.
event msg(std::string_view payload, bool is_text) {
    return {"message", std::string(payload), is_text, 0};
}

// Feeds one frame to a fresh reader and returns the result.
std::uint16_t feed_one(std::string_view frame,
                       std::size_t max = default_max) {
    ws_reader r(max);
    recorder rec;
    return feed_all(r, frame, rec);
}

}  // namespace

TEST_SUITE("ws_reader") {

TEST_CASE("a masked text frame is delivered as one text message") {
    ws_reader r(default_max);
    recorder rec;
    CHECK(feed_all(r, client_frame(opcode::text, "Hello"), rec) == 0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] == msg("Hello", true));
    CHECK(r.idle());
}

TEST_CASE("a binary frame is delivered without UTF-8 checks") {
    ws_reader r(default_max);
    recorder rec;
    std::string payload("\xFF\xFE\x00\xC0", 4);
    CHECK(feed_all(r, client_frame(opcode::binary, payload), rec) == 0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] == msg(payload, false));
}

TEST_CASE("several frames in one feed are delivered in order") {
    ws_reader r(default_max);
    recorder rec;
    std::string bytes = client_frame(opcode::text, "one") +
                        client_frame(opcode::ping, "p") +
                        client_frame(opcode::binary, pattern(300)) +
                        client_frame(opcode::pong, "") +
                        client_frame(opcode::text, "two");
    CHECK(feed_all(r, bytes, rec) == 0);
    std::vector<event> want{msg("one", true),
                            {"ping", "p", false, 0},
                            msg(pattern(300), false),
                            {"pong", "", false, 0},
                            msg("two", true)};
    CHECK(rec.events == want);
    CHECK(r.idle());
}

TEST_CASE("an idle reader is small and holds no heap memory") {
    static_assert(sizeof(ws_reader) <= 32);
    ws_reader r(default_max);
    CHECK(r.idle());
    CHECK(r.held_bytes() == 0);
}

TEST_CASE("a whole frame in one read is delivered with no heap state") {
    ws_reader r(default_max);
    recorder rec;
    rec.watched = &r;
    std::string bytes = client_frame(opcode::text, pattern(1000)) +
                        client_frame(opcode::ping, "x") +
                        client_frame(opcode::binary, "");
    CHECK(feed_all(r, bytes, rec) == 0);
    CHECK(rec.events.size() == 3);
    CHECK(rec.idle_during_call == std::vector<bool>{true, true, true});
    CHECK(r.idle());
}

TEST_CASE("frames fed one byte at a time arrive intact") {
    ws_reader r(1 << 20);
    recorder rec;
    std::vector<std::string> frames{
        client_frame(opcode::text, "hello"),
        client_frame(opcode::binary, pattern(300)),    // 16-bit length
        client_frame(opcode::binary, pattern(70000)),  // 64-bit length
        client_frame(opcode::ping, pattern(125)),
        client_frame(opcode::text, ""),
    };
    for (const auto& f : frames) {
        // Busy from the first byte until the frame is complete.
        CHECK(feed_bytewise(r, std::string_view(f).substr(0, 1), rec) == 0);
        CHECK_FALSE(r.idle());
        CHECK(feed_bytewise(r, std::string_view(f).substr(1), rec) == 0);
        CHECK(r.idle());
        CHECK(r.held_bytes() == 0);
    }
    std::vector<event> want{msg("hello", true), msg(pattern(300), false),
                            msg(pattern(70000), false),
                            {"ping", pattern(125), false, 0},
                            msg("", true)};
    CHECK(rec.events == want);
}

TEST_CASE("every split point of a stream gives the same events") {
    frame_opts more;
    more.fin = false;
    more.key = {0x01, 0x02, 0x03, 0x04};
    std::string bytes =
        client_frame(opcode::text, "abc") +
        client_frame(opcode::binary, pattern(130), more) +
        client_frame(opcode::ping, "ping!") +
        client_frame(opcode::continuation, pattern(9), more) +
        client_frame(opcode::pong, "") +
        client_frame(opcode::continuation, "z") +
        client_frame(opcode::close, close_payload(1000, "bye")) +
        client_frame(opcode::text, "ignored");
    std::vector<event> want{msg("abc", true),
                            {"ping", "ping!", false, 0},
                            {"pong", "", false, 0},
                            msg(pattern(130) + pattern(9) + "z", false),
                            {"close", "bye", false, 1000}};
    for (std::size_t at = 0; at <= bytes.size(); ++at) {
        CAPTURE(at);
        ws_reader r(default_max);
        recorder rec;
        std::string_view all(bytes);
        CHECK(feed_all(r, all.substr(0, at), rec) == 0);
        CHECK(feed_all(r, all.substr(at), rec) == 0);
        CHECK(rec.events == want);
        CHECK(r.idle());
    }

    // The same stream in chunks of every small size.
    for (std::size_t chunk = 1; chunk <= 17; ++chunk) {
        CAPTURE(chunk);
        ws_reader r(default_max);
        recorder rec;
        CHECK(feed_chunks(r, bytes, chunk, rec) == 0);
        CHECK(rec.events == want);
        CHECK(r.idle());
    }
}

TEST_CASE("a ping between fragments is delivered at once and the message "
          "completes intact") {
    frame_opts more;
    more.fin = false;
    std::string first = client_frame(opcode::text, "Hel", more);
    std::string ping = client_frame(opcode::ping, "are you there");
    std::string last = client_frame(opcode::continuation, "lo");

    SUBCASE("whole frames per call") {
        ws_reader r(default_max);
        recorder rec;
        CHECK(feed_all(r, first, rec) == 0);
        CHECK(rec.events.empty());
        CHECK_FALSE(r.idle());
        CHECK(feed_all(r, ping, rec) == 0);
        REQUIRE(rec.events.size() == 1);
        CHECK(rec.events[0] == event{"ping", "are you there", false, 0});
        CHECK_FALSE(r.idle());
        CHECK(feed_all(r, last, rec) == 0);
        REQUIRE(rec.events.size() == 2);
        CHECK(rec.events[1] == msg("Hello", true));
        CHECK(r.idle());
    }
    SUBCASE("one byte at a time") {
        ws_reader r(default_max);
        recorder rec;
        CHECK(feed_bytewise(r, first + ping + last, rec) == 0);
        std::vector<event> want{{"ping", "are you there", false, 0},
                                msg("Hello", true)};
        CHECK(rec.events == want);
        CHECK(r.idle());
    }
}

TEST_CASE("an unmasked client frame is a protocol error") {
    frame_opts o;
    o.masked = false;
    CHECK(feed_one(client_frame(opcode::text, "hi", o)) == 1002);
    CHECK(feed_one(client_frame(opcode::ping, "", o)) == 1002);
    CHECK(feed_one(client_frame(opcode::close, "", o)) == 1002);
}

TEST_CASE("RSV bits are a protocol error") {
    for (std::uint8_t rsv : {0x40, 0x20, 0x10, 0x70}) {
        CAPTURE(int(rsv));
        frame_opts o;
        o.rsv = rsv;
        CHECK(feed_one(client_frame(opcode::text, "hi", o)) == 1002);
        CHECK(feed_one(client_frame(opcode::ping, "", o)) == 1002);
    }
}

TEST_CASE("reserved opcodes are a protocol error") {
    for (std::uint8_t op : {3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF}) {
        CAPTURE(int(op));
        CHECK(feed_one(client_frame(op, "x")) == 1002);
    }
}

TEST_CASE("control frames over 125 bytes or not final are protocol errors") {
    CHECK(feed_one(client_frame(opcode::ping, pattern(125))) == 0);
    CHECK(feed_one(client_frame(opcode::ping, pattern(126))) == 1002);
    CHECK(feed_one(client_frame(opcode::pong, pattern(126))) == 1002);
    CHECK(feed_one(client_frame(opcode::close,
                                close_payload(1000, pattern(124)))) == 1002);
    frame_opts more;
    more.fin = false;
    CHECK(feed_one(client_frame(opcode::ping, "x", more)) == 1002);
    CHECK(feed_one(client_frame(opcode::pong, "x", more)) == 1002);
    CHECK(feed_one(client_frame(opcode::close, "", more)) == 1002);

    // A 64-bit length of a control frame is refused from the header alone.
    frame_opts wide;
    wide.len_form = 64;
    std::string big = client_frame(opcode::ping, pattern(200), wide);
    CHECK(feed_one(std::string_view(big).substr(0, 14)) == 1002);
}

TEST_CASE("a continuation without a started message is a protocol error") {
    CHECK(feed_one(client_frame(opcode::continuation, "x")) == 1002);
    frame_opts more;
    more.fin = false;
    CHECK(feed_one(client_frame(opcode::continuation, "x", more)) == 1002);

    // Also once the previous message has ended.
    std::string bytes = client_frame(opcode::text, "a", more) +
                        client_frame(opcode::continuation, "b") +
                        client_frame(opcode::continuation, "c");
    ws_reader r(default_max);
    recorder rec;
    CHECK(feed_all(r, bytes, rec) == 1002);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] == msg("ab", true));
}

TEST_CASE("a new data frame inside a fragmented message is a protocol "
          "error") {
    frame_opts more;
    more.fin = false;
    std::string first = client_frame(opcode::text, "a", more);
    CHECK(feed_one(first + client_frame(opcode::text, "b")) == 1002);
    CHECK(feed_one(first + client_frame(opcode::binary, "b")) == 1002);
    CHECK(feed_one(first + client_frame(opcode::text, "b", more)) == 1002);

    ws_reader r(default_max);
    recorder rec;
    CHECK(feed_bytewise(r, first + client_frame(opcode::binary, "b"), rec) ==
          1002);
    CHECK(rec.events.empty());
}

TEST_CASE("a message of exactly max_message_bytes is accepted") {
    constexpr std::size_t max = 1000;
    SUBCASE("one frame") {
        ws_reader r(max);
        recorder rec;
        CHECK(feed_all(r, client_frame(opcode::binary, pattern(max)), rec) ==
              0);
        REQUIRE(rec.events.size() == 1);
        CHECK(rec.events[0].payload.size() == max);
    }
    SUBCASE("fragments") {
        frame_opts more;
        more.fin = false;
        std::string bytes =
            client_frame(opcode::text, pattern(400), more) +
            client_frame(opcode::continuation, pattern(500), more) +
            client_frame(opcode::continuation, pattern(100));
        ws_reader r(max);
        recorder rec;
        CHECK(feed_bytewise(r, bytes, rec) == 0);
        REQUIRE(rec.events.size() == 1);
        CHECK(rec.events[0] ==
              msg(pattern(400) + pattern(500) + pattern(100), true));
        CHECK(r.idle());
    }
}

TEST_CASE("a message one byte over max_message_bytes is refused with "
          "1009") {
    constexpr std::size_t max = 1000;
    SUBCASE("one frame") {
        CHECK(feed_one(client_frame(opcode::binary, pattern(max + 1)), max) ==
              1009);
        CHECK(feed_one(client_frame(opcode::text, pattern(max + 1)), max) ==
              1009);
    }
    SUBCASE("fragments") {
        frame_opts more;
        more.fin = false;
        std::string bytes =
            client_frame(opcode::text, pattern(400), more) +
            client_frame(opcode::continuation, pattern(500), more) +
            client_frame(opcode::continuation, pattern(101));
        ws_reader r(max);
        recorder rec;
        CHECK(feed_bytewise(r, bytes, rec) == 1009);
        CHECK(rec.events.empty());
        CHECK(r.idle());
    }
    SUBCASE("a first fragment alone over the limit") {
        frame_opts more;
        more.fin = false;
        CHECK(feed_one(client_frame(opcode::text, pattern(max + 1), more),
                       max) == 1009);
    }
}

TEST_CASE("an oversized frame is refused from its header before its "
          "payload") {
    ws_reader r(1000);
    recorder rec;
    std::string big = client_frame(opcode::binary, pattern(1001));

    // A 16-bit length: refused once its second byte arrives, before the
    // mask.
    CHECK(feed_all(r, std::string_view(big).substr(0, 3), rec) == 0);
    CHECK_FALSE(r.idle());
    CHECK(feed_all(r, std::string_view(big).substr(3, 1), rec) == 1009);
    CHECK(r.idle());
    CHECK(r.held_bytes() == 0);

    // A 64-bit length announcing 1 TiB, header only.
    ws_reader r64(default_max);
    std::string header("\x82\xFF\x00\x00\x01\x00\x00\x00\x00\x00", 10);
    CHECK(feed_all(r64, header, rec) == 1009);

    // The same for a continuation that pushes the total over.
    frame_opts more;
    more.fin = false;
    ws_reader r2(100);
    CHECK(feed_all(r2, client_frame(opcode::text, pattern(60), more), rec) ==
          0);
    std::string next = client_frame(opcode::continuation, pattern(41));
    CHECK(feed_all(r2, std::string_view(next).substr(0, 2), rec) == 1009);
    CHECK(r2.idle());
    CHECK(rec.events.empty());
}

TEST_CASE("a 64-bit length with the top bit set is a protocol error") {
    std::string frame;
    frame.push_back(static_cast<char>(0x82));
    frame.push_back(static_cast<char>(0x80 | 127));
    frame.push_back(static_cast<char>(0x80));
    frame.append(7, '\0');
    frame.append(4, 'k');
    CHECK(feed_one(frame, SIZE_MAX) == 1002);

    ws_reader r(SIZE_MAX);
    recorder rec;
    CHECK(feed_bytewise(r, frame, rec) == 1002);
}

TEST_CASE("non-minimal length encodings are accepted") {
    frame_opts o16;
    o16.len_form = 16;
    frame_opts o64;
    o64.len_form = 64;
    ws_reader r(default_max);
    recorder rec;
    std::string bytes = client_frame(opcode::text, "short", o16) +
                        client_frame(opcode::binary, "tiny", o64) +
                        client_frame(opcode::ping, "p", o16);
    CHECK(feed_all(r, bytes, rec) == 0);
    std::vector<event> want{msg("short", true), msg("tiny", false),
                            {"ping", "p", false, 0}};
    CHECK(rec.events == want);
}

TEST_CASE("text messages are validated as UTF-8 when complete") {
    frame_opts more;
    more.fin = false;
    const std::string euro = "\xE2\x82\xAC";  // U+20AC, three bytes

    SUBCASE("a character split across two fragments is accepted") {
        ws_reader r(default_max);
        recorder rec;
        std::string bytes =
            client_frame(opcode::text, "a" + euro.substr(0, 2), more) +
            client_frame(opcode::continuation, euro.substr(2) + "b");
        CHECK(feed_all(r, bytes, rec) == 0);
        REQUIRE(rec.events.size() == 1);
        CHECK(rec.events[0] == msg("a" + euro + "b", true));
    }
    SUBCASE("valid multi-byte text in one frame is accepted") {
        CHECK(feed_one(client_frame(opcode::text,
                                    "\xC3\xA9" + euro +
                                        "\xF0\x9F\x98\x80")) == 0);
    }
    SUBCASE("a lone 0xC0 is refused with 1007") {
        CHECK(feed_one(client_frame(opcode::text, "\xC0")) == 1007);
    }
    SUBCASE("a truncated three-byte sequence is refused with 1007") {
        CHECK(feed_one(client_frame(opcode::text, euro.substr(0, 2))) ==
              1007);
        std::string bytes =
            client_frame(opcode::text, "a", more) +
            client_frame(opcode::continuation, euro.substr(0, 2));
        CHECK(feed_one(bytes) == 1007);
    }
    SUBCASE("overlong encodings are refused with 1007") {
        CHECK(feed_one(client_frame(opcode::text, "\xC0\xAF")) == 1007);
        CHECK(feed_one(client_frame(opcode::text, "\xE0\x80\xAF")) == 1007);
        CHECK(feed_one(client_frame(opcode::text, "\xF0\x80\x80\xAF")) ==
              1007);
    }
    SUBCASE("surrogates and code points past U+10FFFF are refused") {
        CHECK(feed_one(client_frame(opcode::text, "\xED\xA0\x80")) == 1007);
        CHECK(feed_one(client_frame(opcode::text, "\xF4\x90\x80\x80")) ==
              1007);
    }
    SUBCASE("invalid bytes in a binary message are accepted") {
        CHECK(feed_one(client_frame(opcode::binary, "\xC0")) == 0);
    }
}

TEST_CASE("an empty close frame reports 1005 with no reason") {
    ws_reader r(default_max);
    recorder rec;
    CHECK(feed_all(r, client_frame(opcode::close, ""), rec) == 0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] == event{"close", "", false, 1005});
    CHECK(r.idle());
}

TEST_CASE("a close frame with a code and a reason is delivered") {
    for (bool bytewise : {false, true}) {
        CAPTURE(bytewise);
        ws_reader r(default_max);
        recorder rec;
        std::string frame =
            client_frame(opcode::close, close_payload(1001, "going \xC3\xA9"));
        CHECK((bytewise ? feed_bytewise(r, frame, rec)
                        : feed_all(r, frame, rec)) == 0);
        REQUIRE(rec.events.size() == 1);
        CHECK(rec.events[0] == event{"close", "going \xC3\xA9", false, 1001});
        CHECK(r.idle());
    }
}

TEST_CASE("a close payload of one byte is a protocol error") {
    CHECK(feed_one(client_frame(opcode::close, "\x03")) == 1002);
}

TEST_CASE("close frames with invalid codes are protocol errors") {
    for (std::uint16_t code :
         {0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
          65535}) {
        CAPTURE(code);
        CHECK(feed_one(client_frame(opcode::close, close_payload(code))) ==
              1002);
    }
}

TEST_CASE("close frames with valid codes are accepted") {
    for (std::uint16_t code :
         {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
          1014, 3000, 4001, 4999}) {
        CAPTURE(code);
        ws_reader r(default_max);
        recorder rec;
        CHECK(feed_all(r, client_frame(opcode::close, close_payload(code)),
                       rec) == 0);
        REQUIRE(rec.events.size() == 1);
        CHECK(rec.events[0].code == code);
    }
}

TEST_CASE("a close reason that is not UTF-8 is refused with 1007") {
    CHECK(feed_one(client_frame(opcode::close, close_payload(1000, "\xC0"))) ==
          1007);
    CHECK(feed_one(client_frame(opcode::close,
                                close_payload(1000, "ok\xE2\x82"))) == 1007);
}

TEST_CASE("input after a close frame is ignored") {
    ws_reader r(default_max);
    recorder rec;
    std::string bytes = client_frame(opcode::close, close_payload(1000)) +
                        client_frame(opcode::text, "late") + "\xFF\xFF";
    CHECK(feed_all(r, bytes, rec) == 0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0].kind == "close");

    // Later input, valid or not, is ignored too.
    CHECK(feed_all(r, client_frame(opcode::text, "later"), rec) == 0);
    CHECK(feed_all(r, "\x00\x00garbage", rec) == 0);
    CHECK(rec.events.size() == 1);
    CHECK(r.idle());
}

TEST_CASE("a close frame inside a fragmented message frees the message") {
    frame_opts more;
    more.fin = false;
    ws_reader r(default_max);
    recorder rec;
    CHECK(feed_all(r, client_frame(opcode::binary, pattern(500), more), rec) ==
          0);
    CHECK_FALSE(r.idle());
    CHECK(feed_all(r, client_frame(opcode::close, close_payload(1000)), rec) ==
          0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0].kind == "close");
    CHECK(r.idle());
    CHECK(feed_all(r, client_frame(opcode::continuation, "x"), rec) == 0);
    CHECK(rec.events.size() == 1);
}

TEST_CASE("after an error every feed returns the same error") {
    struct error_case {
        std::string bytes;
        std::uint16_t code;
    };
    frame_opts unmasked;
    unmasked.masked = false;
    std::vector<error_case> cases{
        {client_frame(opcode::text, "x", unmasked), 1002},
        {client_frame(opcode::text, "\xC0"), 1007},
        {client_frame(opcode::binary, pattern(101)), 1009},
    };
    for (const auto& c : cases) {
        CAPTURE(c.code);
        ws_reader r(100);
        recorder rec;
        CHECK(feed_all(r, c.bytes, rec) == c.code);
        CHECK(r.idle());
        CHECK(feed_all(r, client_frame(opcode::text, "fine"), rec) == c.code);
        CHECK(feed_all(r, client_frame(opcode::close, ""), rec) == c.code);
        CHECK(r.feed(nullptr, 0, rec) == c.code);
        CHECK(rec.events.empty());
    }
}

TEST_CASE("a partial message is held on the heap until it completes") {
    ws_reader r(default_max);
    recorder rec;
    std::string frame = client_frame(opcode::binary, pattern(4000));
    std::string_view all(frame);
    CHECK(feed_all(r, all.substr(0, 2000), rec) == 0);
    CHECK_FALSE(r.idle());
    CHECK(r.held_bytes() >= 2000 - 8);
    CHECK(rec.events.empty());
    CHECK(feed_all(r, all.substr(2000), rec) == 0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] == msg(pattern(4000), false));
    CHECK(r.idle());
    CHECK(r.held_bytes() == 0);
}

TEST_CASE("a reader holds no more than what arrived of a large frame") {
    ws_reader r(1 << 20);
    recorder rec;
    std::string frame = client_frame(opcode::binary, pattern(1 << 20));

    // Header (14 bytes) and 100 payload bytes of an announced 1 MiB.
    CHECK(feed_all(r, std::string_view(frame).substr(0, 114), rec) == 0);
    CHECK_FALSE(r.idle());
    CHECK(r.held_bytes() < 4096);
}

TEST_CASE("a partial header keeps the reader busy until its frame ends") {
    ws_reader r(default_max);
    recorder rec;
    std::string frame = client_frame(opcode::ping, "abc");
    CHECK(feed_all(r, std::string_view(frame).substr(0, 1), rec) == 0);
    CHECK_FALSE(r.idle());
    CHECK(feed_all(r, std::string_view(frame).substr(1), rec) == 0);
    CHECK(r.idle());
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] == event{"ping", "abc", false, 0});
}

TEST_CASE("errors in a partial header are found from its first bytes") {
    recorder rec;
    {
        ws_reader r(default_max);
        CHECK(feed_all(r, "\xC1", rec) == 1002);  // RSV1
    }
    {
        ws_reader r(default_max);
        CHECK(feed_all(r, "\x83", rec) == 1002);  // reserved opcode
    }
    {
        ws_reader r(default_max);
        CHECK(feed_all(r, "\x81", rec) == 0);
        CHECK(feed_all(r, "\x05", rec) == 1002);  // unmasked
    }
    {
        ws_reader r(default_max);
        CHECK(feed_all(r, "\x80", rec) == 1002);  // continuation, no message
    }
}

TEST_CASE("a moved reader keeps its partial message") {
    frame_opts more;
    more.fin = false;
    ws_reader a(default_max);
    recorder rec;
    CHECK(feed_all(a, client_frame(opcode::text, "Hel", more), rec) == 0);
    ws_reader b(std::move(a));
    CHECK_FALSE(b.idle());
    CHECK(feed_all(b, client_frame(opcode::continuation, "lo"), rec) == 0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] == msg("Hello", true));

    ws_reader c(10);
    c = std::move(b);
    CHECK(c.idle());
}

TEST_CASE("empty messages and empty fragments are delivered") {
    frame_opts more;
    more.fin = false;
    ws_reader r(default_max);
    recorder rec;
    std::string bytes = client_frame(opcode::text, "") +
                        client_frame(opcode::binary, "", more) +
                        client_frame(opcode::continuation, "", more) +
                        client_frame(opcode::continuation, "");
    CHECK(feed_bytewise(r, bytes, rec) == 0);
    std::vector<event> want{msg("", true), msg("", false)};
    CHECK(rec.events == want);
    CHECK(r.idle());
}

TEST_CASE("payloads unmask correctly whatever the chunking") {
    frame_opts o;
    o.key = {0xA5, 0x5A, 0xFF, 0x01};
    std::string payload = pattern(1001);
    std::string frame = client_frame(opcode::binary, payload, o);
    for (std::size_t chunk : {1, 2, 3, 5, 7, 8, 9, 13, 64, 1000}) {
        CAPTURE(chunk);
        ws_reader r(default_max);
        recorder rec;
        CHECK(feed_chunks(r, frame, chunk, rec) == 0);
        REQUIRE(rec.events.size() == 1);
        CHECK(rec.events[0].payload == payload);
    }
}

}  // TEST_SUITE("ws_reader")

TEST_SUITE("ws encoding") {

TEST_CASE("frame_header_size uses the minimal length form") {
    CHECK(frame_header_size(0) == 2);
    CHECK(frame_header_size(125) == 2);
    CHECK(frame_header_size(126) == 4);
    CHECK(frame_header_size(65535) == 4);
    CHECK(frame_header_size(65536) == 10);
    CHECK(frame_header_size(std::size_t{1} << 40) == 10);
}

TEST_CASE("write_frame_header writes FIN, the opcode and the length "
          "unmasked") {
    char h[10];
    CHECK(write_frame_header(h, opcode::text, 125) == 2);
    CHECK(static_cast<std::uint8_t>(h[0]) == 0x81);
    CHECK(static_cast<std::uint8_t>(h[1]) == 125);

    CHECK(write_frame_header(h, opcode::binary, 126) == 4);
    CHECK(static_cast<std::uint8_t>(h[0]) == 0x82);
    CHECK(static_cast<std::uint8_t>(h[1]) == 126);
    CHECK(static_cast<std::uint8_t>(h[2]) == 0);
    CHECK(static_cast<std::uint8_t>(h[3]) == 126);

    CHECK(write_frame_header(h, opcode::ping, 0xABCD) == 4);
    CHECK(static_cast<std::uint8_t>(h[0]) == 0x89);
    CHECK(static_cast<std::uint8_t>(h[2]) == 0xAB);
    CHECK(static_cast<std::uint8_t>(h[3]) == 0xCD);

    CHECK(write_frame_header(h, opcode::binary, 0x0102030405ULL) == 10);
    CHECK(static_cast<std::uint8_t>(h[1]) == 127);
    const std::uint8_t want[8] = {0, 0, 0, 1, 2, 3, 4, 5};
    for (int i = 0; i < 8; ++i) {
        CHECK(static_cast<std::uint8_t>(h[2 + i]) == want[i]);
    }
}

TEST_CASE("encode_frame appends header and payload to the buffer") {
    std::string out = "xy";
    encode_frame(out, opcode::text, "hello");
    CHECK(out == std::string("xy\x81\x05hello"));

    std::string big = pattern(70000);
    out.clear();
    encode_frame(out, opcode::binary, big);
    CHECK(out.size() == 10 + big.size());
    CHECK(out.substr(10) == big);
    CHECK(static_cast<std::uint8_t>(out[0]) == 0x82);
    CHECK(static_cast<std::uint8_t>(out[1]) == 127);  // mask bit clear

    out.clear();
    encode_frame(out, opcode::pong, "");
    CHECK(out == std::string("\x8A\x00", 2));
}

TEST_CASE("encode_close writes the code and the reason") {
    std::string out;
    encode_close(out, 1001, "drain");
    CHECK(out == std::string("\x88\x07\x03\xE9"
                             "drain"));
    out.clear();
    encode_close(out, 4001);
    CHECK(out == std::string("\x88\x02\x0F\xA1"));
}

TEST_CASE("encode_close truncates the reason at a UTF-8 boundary") {
    std::string out;
    encode_close(out, 1000, pattern(200));
    CHECK(out.size() == 2 + 125);
    CHECK(out.substr(4) == pattern(123));

    // A character that straddles the 123-byte reason limit is dropped
    // whole, whatever its length and position.
    const std::string chars[] = {"\xC3\xA9", "\xE2\x82\xAC",
                                 "\xF0\x9F\x98\x80"};
    for (const auto& ch : chars) {
        for (std::size_t lead = 118; lead <= 123; ++lead) {
            CAPTURE(ch.size());
            CAPTURE(lead);
            std::string reason = std::string(lead, 'a') + ch + "tail";
            out.clear();
            encode_close(out, 1000, reason);
            std::string sent = out.substr(4);
            CHECK(out.size() <= 2 + 125);
            CHECK(static_cast<std::uint8_t>(out[1]) == 2 + sent.size());
            CHECK(simdjson::validate_utf8(sent.data(), sent.size()));
            CHECK(reason.compare(0, sent.size(), sent) == 0);
            std::size_t want = lead;  // the character does not fit
            if (reason.size() <= 123) {
                want = reason.size();
            } else if (lead + ch.size() <= 123) {
                want = 123;  // cut inside the ASCII tail
            }
            CHECK(sent.size() == want);
        }
    }
}

TEST_CASE("a close frame from encode_close is accepted by the reader") {
    std::string out;
    encode_close(out, 4003, "slow consumer \xE2\x82\xAC");

    // Mask the server frame as a client would send it.
    std::string payload = out.substr(2);
    ws_reader r(default_max);
    recorder rec;
    CHECK(feed_all(r, client_frame(opcode::close, payload), rec) == 0);
    REQUIRE(rec.events.size() == 1);
    CHECK(rec.events[0] ==
          event{"close", "slow consumer \xE2\x82\xAC", false, 4003});
}

}  // TEST_SUITE("ws encoding")

TEST_SUITE("ws handshake") {

TEST_CASE("accept_key matches the RFC 6455 example") {
    CHECK(accept_key("dGhlIHNhbXBsZSBub25jZQ==") ==
          "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

TEST_CASE("valid_client_key accepts base64 of 16 bytes only") {
    CHECK(valid_client_key("dGhlIHNhbXBsZSBub25jZQ=="));
    CHECK(valid_client_key("AAAAAAAAAAAAAAAAAAAAAA=="));
    CHECK(valid_client_key("+/+/+/+/+/+/+/+/+/+/+w=="));
    CHECK_FALSE(valid_client_key(""));
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25jZQ="));    // 23 chars
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25jZQ"));     // no padding
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25jZQAA"));   // 18 bytes
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25jZQ=A"));   // bad pad
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25jZ-=="));   // url alphabet
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25jZ===="));  // 25 chars
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25j ZQ=="));  // space
    CHECK_FALSE(valid_client_key("dGhlIHNhbXBsZSBub25jZXMhIQ=="));  // 20 B
}

TEST_CASE("valid_close_code follows RFC 6455 section 7.4") {
    for (std::uint32_t c = 0; c <= 0xFFFF; ++c) {
        auto code = static_cast<std::uint16_t>(c);
        bool want = (c >= 1000 && c <= 1003) || (c >= 1007 && c <= 1014) ||
                    (c >= 3000 && c <= 4999);
        if (valid_close_code(code) != want) {
            CAPTURE(c);
            CHECK(valid_close_code(code) == want);
        }
    }
    CHECK(valid_close_code(1000));
    CHECK(valid_close_code(4002));
    CHECK_FALSE(valid_close_code(1005));
    CHECK_FALSE(valid_close_code(1006));
    CHECK_FALSE(valid_close_code(1015));
}

}  // TEST_SUITE("ws handshake")
