#include "routing/peer_codec.hpp"

#include <chrono>

#include <msgpack.hpp>

namespace pushy::peer {

namespace {

// msgpack's packer writes into anything with write(const char*, size_t).
struct string_sink {
    std::string& out;
    void write(const char* p, std::size_t n) { out.append(p, n); }
};

// Reserves the length prefix, runs `body`, then fills the prefix in.
template <class Body>
void frame(std::string& out, Body body) {
    std::size_t start = out.size();
    out.append(4, '\0');
    string_sink sink{out};
    msgpack::packer<string_sink> pk(sink);
    body(pk);
    auto n = static_cast<std::uint32_t>(out.size() - start - 4);
    out[start] = static_cast<char>(n >> 24);
    out[start + 1] = static_cast<char>(n >> 16);
    out[start + 2] = static_cast<char>(n >> 8);
    out[start + 3] = static_cast<char>(n);
}

void pack_str(msgpack::packer<string_sink>& pk, std::string_view s) {
    pk.pack_str(static_cast<std::uint32_t>(s.size()));
    pk.pack_str_body(s.data(), static_cast<std::uint32_t>(s.size()));
}

bool get_str(const msgpack::object& o, std::string& out) {
    if (o.type != msgpack::type::STR) return false;
    out.assign(o.via.str.ptr, o.via.str.size);
    return true;
}

template <class T>
bool get_uint(const msgpack::object& o, T& out) {
    if (o.type != msgpack::type::POSITIVE_INTEGER) return false;
    out = static_cast<T>(o.via.u64);
    return true;
}

// Strings are read from the frame itself, not copied into the zone first:
// next() copies each into its field before the frame's bytes go.
bool reference_strings(msgpack::type::object_type, std::size_t, void*) {
    return true;
}

// The zone that a frame's objects live in while it is decoded: one per
// thread, cleared for each frame, so decoding allocates nothing once its
// first chunk is there (a zone of its own per frame cost a malloc and a
// free of 8 KiB each).
msgpack::zone& frame_zone() {
    thread_local msgpack::zone zone;
    zone.clear();
    return zone;
}

}  // namespace

void encode(std::string& out, const request& r) {
    frame(out, [&](auto& pk) {
        pk.pack_array(12);
        pk.pack_uint8(1);
        pk.pack_uint64(r.id);
        pk.pack_uint8(static_cast<std::uint8_t>(r.what));
        pack_str(pk, r.device);
        pack_str(pk, r.data);
        if (r.want_ack) {
            pk.pack_true();
        } else {
            pk.pack_false();
        }
        pk.pack_uint32(r.timeout_ms);
        pack_str(pk, r.from);
        pk.pack_uint64(r.conn);
        pack_str(pk, r.account);
        pack_str(pk, r.msg_id);
        pk.pack_uint64(r.deadline_ms);
    });
}

std::uint64_t wall_ms() noexcept {
    return static_cast<std::uint64_t>(
        std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::system_clock::now().time_since_epoch())
            .count());
}

void encode(std::string& out, const reply& r) {
    frame(out, [&](auto& pk) {
        pk.pack_array(7);
        pk.pack_uint8(2);
        pk.pack_uint64(r.id);
        pk.pack_uint16(r.code);
        pack_str(pk, r.status);
        pack_str(pk, r.node);
        pk.pack_uint64(r.push_id);
        pack_str(pk, r.reason);
    });
}

frame_reader::result frame_reader::next(request& req, reply& rep) {
    // Drop what was consumed once it is a good part of the buffer.
    if (pos_ > 0 && pos_ * 2 >= buf_.size()) {
        buf_.erase(0, pos_);
        pos_ = 0;
    }
    if (buf_.size() - pos_ < 4) return result::none;
    auto b = reinterpret_cast<const unsigned char*>(buf_.data() + pos_);
    std::size_t n = (std::size_t{b[0]} << 24) | (std::size_t{b[1]} << 16) |
                    (std::size_t{b[2]} << 8) | b[3];
    if (n > max_frame_bytes) {
        error_ = "frame of " + std::to_string(n) + " bytes is too large";
        return result::error;
    }
    if (buf_.size() - pos_ - 4 < n) return result::none;
    const char* body = buf_.data() + pos_ + 4;
    pos_ += 4 + n;

    msgpack::object o;
    try {
        o = msgpack::unpack(frame_zone(), body, n, reference_strings);
    } catch (const std::exception& e) {
        error_ = std::string("malformed frame: ") + e.what();
        return result::error;
    }
    if (o.type != msgpack::type::ARRAY || o.via.array.size < 1) {
        error_ = "a frame must be an array";
        return result::error;
    }
    const auto* a = o.via.array.ptr;
    auto size = o.via.array.size;
    unsigned type = 0;
    if (!get_uint(a[0], type)) {
        error_ = "frame type must be an integer";
        return result::error;
    }
    if (type == 1 && size >= 11) {
        unsigned k = 0;
        bool ok = get_uint(a[1], req.id) && get_uint(a[2], k) &&
                  get_str(a[3], req.device) && get_str(a[4], req.data) &&
                  a[5].type == msgpack::type::BOOLEAN &&
                  get_uint(a[6], req.timeout_ms) && get_str(a[7], req.from) &&
                  get_uint(a[8], req.conn) && get_str(a[9], req.account) &&
                  get_str(a[10], req.msg_id) && k >= 1 && k <= 4 &&
                  (size < 12 || get_uint(a[11], req.deadline_ms));
        if (ok) {
            req.want_ack = a[5].via.boolean;
            req.what = static_cast<kind>(k);
            return result::request;
        }
    } else if (type == 2 && size >= 7) {
        bool ok = get_uint(a[1], rep.id) && get_uint(a[2], rep.code) &&
                  get_str(a[3], rep.status) && get_str(a[4], rep.node) &&
                  get_uint(a[5], rep.push_id) && get_str(a[6], rep.reason);
        if (ok) return result::reply;
    }
    error_ = "malformed frame of type " + std::to_string(type);
    return result::error;
}

}  // namespace pushy::peer
