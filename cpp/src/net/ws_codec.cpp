#include "net/ws_codec.hpp"

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <simdjson.h>

#include <algorithm>
#include <array>
#include <cstring>

namespace pushy::ws {

namespace {

// Bits of ws_reader::flags_. An error keeps its own bit so every later
// feed() answers with the same close code.
constexpr std::uint8_t flag_closed = 0x01;
constexpr std::uint8_t flag_protocol_error = 0x02;
constexpr std::uint8_t flag_invalid_payload = 0x04;
constexpr std::uint8_t flag_too_big = 0x08;

// Opcodes as they appear in the low nibble of the first header byte.
constexpr auto op_continuation =
    static_cast<std::uint8_t>(opcode::continuation);
constexpr auto op_text = static_cast<std::uint8_t>(opcode::text);
constexpr auto op_binary = static_cast<std::uint8_t>(opcode::binary);
constexpr auto op_close = static_cast<std::uint8_t>(opcode::close);
constexpr auto op_ping = static_cast<std::uint8_t>(opcode::ping);
constexpr auto op_pong = static_cast<std::uint8_t>(opcode::pong);

// RFC 6455 section 5.5: control frames carry at most 125 payload bytes.
constexpr std::size_t max_control_payload = 125;

// RFC 6455 section 5.2: 2 fixed bytes, up to 8 length bytes, 4 mask bytes.
constexpr std::size_t max_header_size = 14;

// RFC 6455 section 1.3: appended to the client key before hashing.
constexpr std::string_view accept_guid = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

// One frame whose header has been read.
struct frame_info {
    std::uint64_t remaining = 0;  // payload bytes not yet received
    std::array<std::uint8_t, 4> mask{};
    std::uint8_t mask_pos = 0;  // payload bytes already unmasked, modulo 4
    std::uint8_t op = 0;
    bool fin = false;
};

// True for close, ping and pong (RFC 6455 section 5.5: opcode bit 3 set).
bool is_control(std::uint8_t op) noexcept { return (op & 0x08) != 0; }

// Total header size announced by the first two bytes, or 2 while fewer than
// two bytes are known (section 5.2).
std::size_t header_size_needed(const std::uint8_t* h,
                               std::size_t have) noexcept {
    if (have < 2) return 2;
    std::uint8_t len7 = h[1] & 0x7F;
    std::size_t extra = len7 == 126 ? 2 : len7 == 127 ? 8 : 0;
    return 2 + extra + 4;  // the mask is always present (checked earlier)
}

// Decodes the payload length of a header whose length bytes are all here.
// Non-minimal encodings are accepted: section 5.2 asks the sender for the
// minimal form but any form carries the same length.
std::uint64_t decode_length(const std::uint8_t* h) noexcept {
    std::uint8_t len7 = h[1] & 0x7F;
    if (len7 == 126) return (std::uint64_t{h[2]} << 8) | h[3];
    if (len7 < 126) return len7;
    std::uint64_t len = 0;
    for (std::size_t i = 0; i < 8; ++i) len = (len << 8) | h[2 + i];
    return len;
}

// Checks the part of a frame header that is here (`have` bytes, possibly
// more than the header), so a bad frame is refused as soon as the byte that
// makes it bad arrives: a message too big is refused from its length,
// before any payload is buffered. `room` is how many more message bytes
// the limit allows. Returns 0 or a close code.
std::uint16_t check_header(const std::uint8_t* h, std::size_t have,
                           bool in_message, std::size_t room) noexcept {
    if (have == 0) return 0;
    std::uint8_t b0 = h[0];
    std::uint8_t op = b0 & 0x0F;
    bool fin = (b0 & 0x80) != 0;

    // RSV1-3 must be 0 unless an extension defines them (section 5.2); no
    // extension is ever negotiated.
    if ((b0 & 0x70) != 0) return close_protocol_error;

    // Opcodes 0x3-0x7 and 0xB-0xF are reserved (section 5.2).
    if (op > op_binary && op < op_close) return close_protocol_error;
    if (op > op_pong) return close_protocol_error;

    // Control frames must not be fragmented (section 5.5).
    if (is_control(op) && !fin) return close_protocol_error;

    // Continuation only inside a fragmented message, and a new data message
    // not before the current one ends (section 5.4).
    if (op == op_continuation && !in_message) return close_protocol_error;
    bool starts_message = op == op_text || op == op_binary;
    if (starts_message && in_message) return close_protocol_error;
    if (have < 2) return 0;

    // Client frames must be masked (section 5.1).
    if ((h[1] & 0x80) == 0) return close_protocol_error;

    // The rest needs the whole length field.
    std::uint8_t len7 = h[1] & 0x7F;
    std::size_t length_end = len7 == 126 ? 4 : len7 == 127 ? 10 : 2;
    if (have < length_end) return 0;
    std::uint64_t len = decode_length(h);

    // Section 5.2: the most significant bit of a 64-bit length must be 0.
    if ((len >> 63) != 0) return close_protocol_error;

    // Section 5.5: control frames carry at most 125 bytes.
    if (is_control(op)) {
        return len > max_control_payload ? close_protocol_error : 0;
    }
    return len > room ? close_too_big : 0;
}

// Decodes a complete header that check_header accepted.
frame_info parse_header(const std::uint8_t* h) noexcept {
    frame_info f;
    f.op = h[0] & 0x0F;
    f.fin = (h[0] & 0x80) != 0;
    f.remaining = decode_length(h);
    std::size_t mask_at = header_size_needed(h, 2) - 4;
    std::memcpy(f.mask.data(), h + mask_at, 4);
    return f;
}

// XORs `n` bytes of `src` with the masking key into `dst` (section 5.3).
// `pos` is the index of src[0] in the payload modulo 4 and is advanced, so a
// payload unmasked in pieces comes out the same. `dst` may equal `src`.
void unmask(char* dst, const char* src, std::size_t n,
            const std::array<std::uint8_t, 4>& key,
            std::uint8_t& pos) noexcept {
    std::size_t i = 0;

    // Bring the key phase to 0 so the word loop can use the key as is.
    for (; i < n && pos != 0; ++i, pos = (pos + 1) & 3) {
        dst[i] = static_cast<char>(src[i] ^ key[pos]);
    }

    // Eight bytes at a time; memcpy keeps byte order and alignment safe.
    std::uint32_t k4;
    std::memcpy(&k4, key.data(), 4);
    std::uint64_t k8 = (std::uint64_t{k4} << 32) | k4;
    for (; i + 8 <= n; i += 8) {
        std::uint64_t w;
        std::memcpy(&w, src + i, 8);
        w ^= k8;
        std::memcpy(dst + i, &w, 8);
    }
    for (; i < n; ++i, pos = (pos + 1) & 3) {
        dst[i] = static_cast<char>(src[i] ^ key[pos]);
    }
}

// Unmasks a whole payload into a per-thread buffer that keeps its capacity,
// so a frame that arrives in one read costs no allocation. The view is valid
// until the next call on this thread.
std::string_view unmask_to_scratch(const char* src, std::size_t n,
                                   frame_info& f) {
    thread_local std::string scratch;

    // Grow only: shrinking and regrowing would zero-fill each time.
    if (scratch.size() < n) scratch.resize(n);
    unmask(scratch.data(), src, n, f.mask, f.mask_pos);
    return {scratch.data(), n};
}

// Validates a complete data message and hands it to the owner. Returns 0
// or 1007 for a text message that is not UTF-8 (section 8.1).
std::uint16_t deliver_message(std::string_view payload, bool is_text,
                              reader_events& ev) {
    if (is_text && !simdjson::validate_utf8(payload.data(), payload.size())) {
        return close_invalid_payload;
    }
    ev.on_message(payload, is_text);
    return 0;
}

// Decodes the body of a close frame (section 5.5.1). Returns 0 and sets
// `code`/`reason`, or the close code to fail the connection with.
std::uint16_t parse_close(std::string_view payload, std::uint16_t& code,
                          std::string_view& reason) noexcept {
    if (payload.empty()) {
        code = 1005;  // section 7.1.5: no status code was present
        reason = {};
        return 0;
    }
    if (payload.size() == 1) return close_protocol_error;
    auto hi = static_cast<std::uint8_t>(payload[0]);
    auto lo = static_cast<std::uint8_t>(payload[1]);
    code = static_cast<std::uint16_t>((hi << 8) | lo);
    if (!valid_close_code(code)) return close_protocol_error;
    reason = payload.substr(2);
    if (!simdjson::validate_utf8(reason.data(), reason.size())) {
        return close_invalid_payload;
    }
    return 0;
}

}  // namespace

// What the reader keeps between feed() calls while a frame or a message is
// unfinished. Lives on the heap only then.
struct ws_reader::state {
    std::string message;  // unmasked payload of the data message so far
    frame_info frame;     // the frame whose payload is arriving
    std::array<char, max_control_payload> control{};  // control payload
    std::array<std::uint8_t, max_header_size> header{};  // partial header
    std::uint8_t header_len = 0;
    std::uint8_t control_len = 0;
    bool in_frame = false;    // header read, payload still arriving
    bool in_message = false;  // a fragmented data message is open
    bool message_text = false;
};

// Makes an idle reader: nothing is allocated until a frame is split.
ws_reader::ws_reader(std::size_t max_message_bytes)
    : max_message_bytes_(max_message_bytes) {}

// Frees any partial message.
ws_reader::~ws_reader() = default;

// Moves take the partial state along; the moved-from reader is idle.
ws_reader::ws_reader(ws_reader&&) noexcept = default;
ws_reader& ws_reader::operator=(ws_reader&&) noexcept = default;

// Records `code` so later calls repeat it, drops any partial state and
// returns `code`.
std::uint16_t ws_reader::fail(std::uint16_t code) noexcept {
    partial_.reset();
    if (code == close_invalid_payload) {
        flags_ |= flag_invalid_payload;
    } else if (code == close_too_big) {
        flags_ |= flag_too_big;
    } else {
        flags_ |= flag_protocol_error;
    }
    return code;
}

// Returns the partial state, allocating it when the reader was idle.
ws_reader::state& ws_reader::ensure_state() {
    if (!partial_) partial_ = std::make_unique<state>();
    return *partial_;
}

// Frees the partial state once it holds nothing, so an idle connection
// keeps no heap memory.
void ws_reader::release_if_idle() noexcept {
    state* st = partial_.get();
    if (st && !st->in_frame && !st->in_message && st->header_len == 0) {
        partial_.reset();
    }
}

// Hands a complete control frame to the owner (section 5.5). A valid close
// frame marks the reader closed and frees its partial state; that happens
// after on_close, whose `reason` may point into that state, and the flag is
// set before it so an owner that throws still leaves the reader closed.
// Returns 0 or the close code of a malformed close frame.
std::uint16_t ws_reader::deliver_control(std::uint8_t op,
                                         std::string_view payload,
                                         reader_events& ev) {
    if (op == op_ping) {
        ev.on_ping(payload);
        return 0;
    }
    if (op == op_pong) {
        ev.on_pong(payload);
        return 0;
    }
    std::uint16_t code = 0;
    std::string_view reason;
    std::uint16_t err = parse_close(payload, code, reason);
    if (err != 0) return err;
    flags_ |= flag_closed;
    ev.on_close(code, reason);
    partial_.reset();
    return 0;
}

// Parses as many frames as `data` holds, delivering each complete control
// frame and message through `ev`. Frames that arrive whole are unmasked
// into a per-thread scratch buffer; only a frame or message split across
// calls is kept in `partial_`. Returns 0, or the close code once the
// stream is malformed (then and on every later call). After a close frame
// the rest of the input, and all later input, is ignored.
std::uint16_t ws_reader::feed(const char* data, std::size_t size,
                              reader_events& ev) {
    if (flags_ & flag_protocol_error) return close_protocol_error;
    if (flags_ & flag_invalid_payload) return close_invalid_payload;
    if (flags_ & flag_too_big) return close_too_big;
    if (flags_ & flag_closed) return 0;

    const auto* bytes = reinterpret_cast<const std::uint8_t*>(data);
    std::size_t pos = 0;
    while (pos < size) {
        state* st = partial_.get();
        if (st == nullptr || !st->in_frame) {
            // Read the next frame header, from the stash if one was split.
            // Each check runs on the bytes already here (section 10.4: a
            // message over the limit is refused before it is buffered).
            bool in_message = st && st->in_message;
            std::size_t held = in_message ? st->message.size() : 0;
            std::size_t room = max_message_bytes_ - held;
            frame_info f;
            if (st && st->header_len > 0) {
                auto& h = st->header;
                while (pos < size &&
                       st->header_len < header_size_needed(h.data(),
                                                           st->header_len)) {
                    h[st->header_len++] = bytes[pos++];
                }
                std::uint16_t code =
                    check_header(h.data(), st->header_len, in_message, room);
                if (code != 0) return fail(code);
                if (st->header_len < header_size_needed(h.data(),
                                                        st->header_len)) {
                    return 0;  // input used up
                }
                st->header_len = 0;
                f = parse_header(h.data());
            } else {
                std::size_t avail = size - pos;
                std::uint16_t code = check_header(
                    bytes + pos, std::min(avail, max_header_size), in_message,
                    room);
                if (code != 0) return fail(code);
                std::size_t need = header_size_needed(bytes + pos, avail);
                if (avail < need) {
                    // Keep the few header bytes until the rest arrives.
                    state& s = ensure_state();
                    std::memcpy(s.header.data(), bytes + pos, avail);
                    s.header_len = static_cast<std::uint8_t>(avail);
                    return 0;
                }
                f = parse_header(bytes + pos);
                pos += need;
            }

            // A control frame or a one-frame message that is all here is
            // unmasked into scratch and delivered without touching the heap.
            std::size_t avail = size - pos;
            bool whole = is_control(f.op) || (f.fin && !in_message);
            if (whole && f.remaining <= avail) {
                auto n = static_cast<std::size_t>(f.remaining);
                std::string_view payload = unmask_to_scratch(data + pos, n, f);
                pos += n;
                std::uint16_t err = 0;
                if (is_control(f.op)) {
                    err = deliver_control(f.op, payload, ev);
                } else {
                    err = deliver_message(payload, f.op == op_text, ev);
                }
                if (err != 0) return fail(err);
                if (flags_ & flag_closed) return 0;
                release_if_idle();
                continue;
            }

            // The frame continues in later reads or extends a fragmented
            // message: its payload goes to the partial state.
            state& s = ensure_state();
            s.frame = f;
            s.in_frame = true;
            s.control_len = 0;
            if (f.op == op_text || f.op == op_binary) {
                s.in_message = true;
                s.message.clear();  // in case an owner's callback threw
                s.message_text = f.op == op_text;
            }
            st = &s;
        }

        // Take what is here of the current frame's payload. The string grows
        // only by what arrived, not by the announced length, so a client
        // that announces a large frame and stalls holds little memory.
        frame_info& f = st->frame;
        auto n = static_cast<std::size_t>(
            std::min<std::uint64_t>(f.remaining, size - pos));
        if (is_control(f.op)) {
            char* dst = st->control.data() + st->control_len;
            unmask(dst, data + pos, n, f.mask, f.mask_pos);
            st->control_len = static_cast<std::uint8_t>(st->control_len + n);
        } else {
            std::size_t old = st->message.size();
            st->message.append(data + pos, n);
            char* dst = st->message.data() + old;
            unmask(dst, dst, n, f.mask, f.mask_pos);
        }
        pos += n;
        f.remaining -= n;
        if (f.remaining > 0) return 0;  // input used up
        st->in_frame = false;

        // The frame is complete.
        if (is_control(f.op)) {
            std::string_view payload(st->control.data(), st->control_len);
            std::uint16_t err = deliver_control(f.op, payload, ev);
            if (err != 0) return fail(err);
            if (flags_ & flag_closed) return 0;
            release_if_idle();
            continue;
        }
        if (!f.fin) continue;  // more fragments to come (section 5.4)

        // The last fragment: deliver, then free the buffer at once.
        st->in_message = false;
        std::uint16_t err = deliver_message(st->message, st->message_text, ev);
        if (err != 0) return fail(err);
        partial_.reset();
    }
    return 0;
}

// Idle means no heap state: no partial header, frame or message.
bool ws_reader::idle() const noexcept { return partial_ == nullptr; }

// Counts the partial state and the message buffer when it has left the
// string's inline storage.
std::size_t ws_reader::held_bytes() const noexcept {
    if (!partial_) return 0;
    std::size_t n = sizeof(state);
    std::size_t cap = partial_->message.capacity();
    if (cap > std::string().capacity()) n += cap + 1;
    return n;
}

// RFC 6455 section 5.2: 7-bit length up to 125, then 16-bit, then 64-bit.
std::size_t frame_header_size(std::size_t size) noexcept {
    if (size <= 125) return 2;
    if (size <= 0xFFFF) return 4;
    return 10;
}

// Writes FIN=1, no RSV bits, no mask, and the minimal length encoding
// (section 5.2); server frames are never masked (section 5.1).
std::size_t write_frame_header(char* out, opcode op,
                               std::size_t size) noexcept {
    out[0] = static_cast<char>(0x80 | static_cast<std::uint8_t>(op));
    if (size <= 125) {
        out[1] = static_cast<char>(size);
        return 2;
    }
    if (size <= 0xFFFF) {
        out[1] = 126;
        out[2] = static_cast<char>((size >> 8) & 0xFF);
        out[3] = static_cast<char>(size & 0xFF);
        return 4;
    }
    out[1] = 127;
    auto len = static_cast<std::uint64_t>(size);
    for (int i = 0; i < 8; ++i) {
        out[2 + i] = static_cast<char>((len >> (56 - 8 * i)) & 0xFF);
    }
    return 10;
}

// Appends header and payload of one final, unmasked frame to `out`.
void encode_frame(std::string& out, opcode op, std::string_view payload) {
    char header[10];
    std::size_t n = write_frame_header(header, op, payload.size());
    out.append(header, n);
    out.append(payload);
}

// Appends a close frame: the code in network order, then the reason cut to
// fit the 125-byte control payload (section 5.5) at a UTF-8 character
// boundary, since the peer must fail a close reason that is not UTF-8
// (section 5.5.1).
void encode_close(std::string& out, std::uint16_t code,
                  std::string_view reason) {
    constexpr std::size_t max_reason = max_control_payload - 2;
    if (reason.size() > max_reason) {
        std::size_t cut = max_reason;

        // Step back over continuation bytes (10xxxxxx) so the character
        // that straddles the limit is dropped whole.
        while (cut > 0 && (static_cast<std::uint8_t>(reason[cut]) & 0xC0) ==
                              0x80) {
            --cut;
        }
        reason = reason.substr(0, cut);
    }
    char payload[max_control_payload];
    payload[0] = static_cast<char>(code >> 8);
    payload[1] = static_cast<char>(code & 0xFF);
    if (!reason.empty()) {
        std::memcpy(payload + 2, reason.data(), reason.size());
    }
    encode_frame(out, opcode::close,
                 std::string_view(payload, 2 + reason.size()));
}

// A 16-byte value in base64 (RFC 4648 section 4) is 22 alphabet characters
// and "==" (RFC 6455 section 4.1, item 7). The two unused bits of the last
// character are not checked, as a lenient decoder would not.
bool valid_client_key(std::string_view key) noexcept {
    if (key.size() != 24) return false;
    if (key[22] != '=' || key[23] != '=') return false;
    for (std::size_t i = 0; i < 22; ++i) {
        char c = key[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
                  (c >= '0' && c <= '9') || c == '+' || c == '/';
        if (!ok) return false;
    }
    return true;
}

// base64(SHA-1(key + GUID)), RFC 6455 section 4.2.2, item 5.4.
std::string accept_key(std::string_view key) {
    std::string input;
    input.reserve(key.size() + accept_guid.size());
    input.append(key);
    input.append(accept_guid);
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1(reinterpret_cast<const unsigned char*>(input.data()), input.size(),
         digest);

    // 20 bytes encode to 28 characters plus the NUL EVP_EncodeBlock adds.
    unsigned char encoded[4 * ((SHA_DIGEST_LENGTH + 2) / 3) + 1];
    int n = EVP_EncodeBlock(encoded, digest, SHA_DIGEST_LENGTH);
    return std::string(reinterpret_cast<const char*>(encoded),
                       static_cast<std::size_t>(n));
}

// RFC 6455 section 7.4.1 and the IANA registry (section 11.7): 1000-1003
// and 1007-1014 are defined for use on the wire; 1004 is reserved and
// 1005, 1006 and 1015 must never be sent; 1016-2999 are reserved;
// 3000-4999 belong to libraries and applications.
bool valid_close_code(std::uint16_t code) noexcept {
    if (code >= 1000 && code <= 1003) return true;
    if (code >= 1007 && code <= 1014) return true;
    return code >= 3000 && code <= 4999;
}

}  // namespace pushy::ws
