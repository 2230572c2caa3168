#include "queue/queue.hpp"

#include <boost/crc.hpp>
#include <hiredis/hiredis.h>
#include <openssl/rand.h>

#include <simdjson.h>

#include <charconv>

#include "pushy/config.hpp"

namespace pushy::queue {

namespace {

std::string_view text_of(const redisReply* r) {
    if (!r || (r->type != REDIS_REPLY_STRING &&
               r->type != REDIS_REPLY_STATUS)) {
        return {};
    }
    return {r->str, r->len};
}

bool parse_u64(std::string_view s, std::uint64_t& out) {
    auto r = std::from_chars(s.data(), s.data() + s.size(), out);
    return !s.empty() && r.ec == std::errc{} && r.ptr == s.data() + s.size();
}

bool valid_json(std::string_view text) {
    thread_local simdjson::dom::parser parser;
    simdjson::padded_string padded(text);
    simdjson::dom::element ignored;
    return !parser.parse(padded).get(ignored);
}

// One [id, fields] pair of a stream reply.
bool parse_entry(const redisReply* pair, const std::string& stream,
                 std::vector<entry>& out) {
    if (!pair || pair->type != REDIS_REPLY_ARRAY || pair->elements < 2) {
        return false;
    }
    entry e;
    e.stream = stream;
    e.entry_id = std::string(text_of(pair->element[0]));
    if (e.entry_id.empty()) return false;
    // A pending entry that was deleted has nil fields.
    if (pair->element[1]->type == REDIS_REPLY_ARRAY) {
        parse_fields(pair->element[1], e);
    }
    out.push_back(std::move(e));
    return true;
}

}  // namespace

std::string shard_key(std::string_view prefix, unsigned n) {
    std::string k(prefix);
    k += "q:";
    k += std::to_string(n);
    return k;
}

std::string dead_key(std::string_view prefix) {
    std::string k(prefix);
    k += "q:dead";
    return k;
}

unsigned shard_of(std::string_view device, unsigned shards) noexcept {
    boost::crc_32_type crc;
    crc.process_bytes(device.data(), device.size());
    return shards ? crc.checksum() % shards : 0;
}

std::string random_id() {
    unsigned char b[16];
    RAND_bytes(b, sizeof b);
    static constexpr char hex[] = "0123456789abcdef";
    std::string id;
    id.reserve(32);
    for (auto c : b) {
        id += hex[c >> 4];
        id += hex[c & 0xF];
    }
    return id;
}

std::vector<std::string> fields_of(const message& m) {
    return {"id",   m.id,
            "device", m.device,
            "data", m.data,
            "ack",  m.want_ack ? "client" : "written",
            "exp",  std::to_string(m.expires_ms),
            "from", m.from,
            "enq",  std::to_string(m.enqueued_ms)};
}

void parse_fields(const redisReply* fields, entry& e) {
    message m;
    bool has_id = false, has_device = false, has_data = false,
         has_exp = false, bad_ack = false;
    for (std::size_t i = 0; i + 1 < fields->elements; i += 2) {
        auto k = text_of(fields->element[i]);
        auto v = text_of(fields->element[i + 1]);
        e.raw.emplace_back(std::string(k), std::string(v));
        if (k == "id") {
            m.id = std::string(v);
            has_id = !v.empty();
        } else if (k == "device") {
            m.device = std::string(v);
            has_device = !v.empty();
        } else if (k == "data") {
            m.data = std::string(v);
            has_data = !v.empty();
        } else if (k == "ack") {
            m.want_ack = v == "client";
            bad_ack = v != "client" && v != "written";
        } else if (k == "exp") {
            has_exp = parse_u64(v, m.expires_ms);
        } else if (k == "from") {
            m.from = std::string(v);
        } else if (k == "enq") {
            parse_u64(v, m.enqueued_ms);
        }
    }
    if (!has_id) {
        e.error = "no 'id' field";
    } else if (!has_device || m.device.size() > max_device_bytes) {
        e.error = "no valid 'device' field";
    } else if (!has_data) {
        e.error = "no 'data' field";
    } else if (!has_exp) {
        e.error = "no valid 'exp' field";
    } else if (bad_ack) {
        e.error = "'ack' is neither 'written' nor 'client'";
    } else if (!valid_json(m.data)) {
        // The node passes data to the device as it is: it must be JSON.
        e.error = "'data' is not valid JSON";
    } else {
        if (m.from.empty()) m.from = "queue";
        e.msg = std::move(m);
    }
}

bool parse_read_reply(const redisReply* r, std::vector<entry>& out) {
    if (!r) return false;
    if (r->type == REDIS_REPLY_NIL) return true;  // BLOCK timed out
    if (r->type != REDIS_REPLY_ARRAY) return false;
    for (std::size_t i = 0; i < r->elements; ++i) {
        auto* s = r->element[i];
        if (s->type != REDIS_REPLY_ARRAY || s->elements < 2 ||
            s->element[1]->type != REDIS_REPLY_ARRAY) {
            return false;
        }
        std::string stream(text_of(s->element[0]));
        auto* entries = s->element[1];
        for (std::size_t j = 0; j < entries->elements; ++j) {
            if (!parse_entry(entries->element[j], stream, out)) return false;
        }
    }
    return true;
}

bool parse_claim_reply(const redisReply* r, const std::string& stream,
                       std::string& cursor, std::vector<entry>& out) {
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 2 ||
        r->element[1]->type != REDIS_REPLY_ARRAY) {
        return false;
    }
    cursor = std::string(text_of(r->element[0]));
    auto* entries = r->element[1];
    for (std::size_t j = 0; j < entries->elements; ++j) {
        auto* pair = entries->element[j];
        // Redis 7 leaves deleted entries out of this list (they are in
        // the third element); 6.2 lists them with nil fields.
        if (pair->type == REDIS_REPLY_NIL) continue;
        if (!parse_entry(pair, stream, out)) return false;
    }
    if (r->elements >= 3 && r->element[2]->type == REDIS_REPLY_ARRAY) {
        auto* gone = r->element[2];
        for (std::size_t j = 0; j < gone->elements; ++j) {
            entry e;
            e.stream = stream;
            e.entry_id = std::string(text_of(gone->element[j]));
            if (!e.entry_id.empty()) out.push_back(std::move(e));
        }
    }
    return true;
}

}  // namespace pushy::queue
