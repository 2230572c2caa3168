#include "registry/registry.hpp"

#include <hiredis/hiredis.h>

#include <charconv>

namespace pushy::registry {

namespace {

// Each script touches one key, so it runs on Redis Cluster too.

// SET the record and return the one it replaced.
const std::string put_script =
    "local old = redis.call('GET', KEYS[1]) "
    "redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) "
    "return old";

// DEL only if the record starts with the owner prefix.
const std::string remove_script =
    "local v = redis.call('GET', KEYS[1]) "
    "if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then "
    "  return redis.call('DEL', KEYS[1]) end "
    "return 0";

// Extend when owned; write again when gone. A record of another connection
// is taken over when it is from this node (the caller's table knows the
// live one) or from an older connection elsewhere, whose delete may have
// been lost in an outage: the old record is returned, to close it. Else 0.
const std::string refresh_script =
    "local v = redis.call('GET', KEYS[1]) "
    "if not v then "
    "  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 2 end "
    "if string.sub(v, 1, #ARGV[1]) == ARGV[1] then "
    "  redis.call('PEXPIRE', KEYS[1], ARGV[3]) return 1 end "
    "local at = tonumber(string.match(v, "
    "  '^[^\t]*\t[^\t]*\t[^\t]*\t([^\t]*)\t')) "
    "if string.sub(v, 1, #ARGV[4]) == ARGV[4] or "
    "   (at and at < tonumber(ARGV[5])) then "
    "  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return v end "
    "return 0";

const std::string put_sha = redis::script_sha1(put_script);
const std::string remove_sha = redis::script_sha1(remove_script);
const std::string refresh_sha = redis::script_sha1(refresh_script);

template <class T>
bool parse_int(std::string_view s, T& out) {
    auto r = std::from_chars(s.data(), s.data() + s.size(), out);
    return r.ec == std::errc{} && r.ptr == s.data() + s.size();
}

}  // namespace

std::string format_record(const record& r) {
    std::string s = owner_prefix(r.node, r.peer, r.conn);
    s += std::to_string(r.connected_at);
    s += '\t';
    s += r.account;
    return s;
}

std::string owner_prefix(std::string_view node, std::string_view peer,
                         std::uint64_t conn) {
    std::string s;
    s.reserve(node.size() + peer.size() + 24);
    s += node;
    s += '\t';
    s += peer;
    s += '\t';
    s += std::to_string(conn);
    s += '\t';
    return s;
}

std::optional<record> parse_record(std::string_view text) {
    record r;
    std::string_view fields[4];
    for (auto& f : fields) {
        auto tab = text.find('\t');
        if (tab == std::string_view::npos) return std::nullopt;
        f = text.substr(0, tab);
        text.remove_prefix(tab + 1);
    }
    r.node = std::string(fields[0]);
    r.peer = std::string(fields[1]);
    if (!parse_int(fields[2], r.conn) ||
        !parse_int(fields[3], r.connected_at) || r.node.empty()) {
        return std::nullopt;
    }
    r.account = std::string(text);
    return r;
}

store::store(redis::client& redis, std::string prefix)
    : redis_(redis), prefix_(std::move(prefix)) {}

std::string store::device_key(std::string_view device) const {
    std::string k;
    k.reserve(prefix_.size() + device.size() + 6);
    k += prefix_;
    k += "dev:{";
    k += device;
    k += '}';
    return k;
}

std::string store::node_key(std::string_view node) const {
    return prefix_ + "node:" + std::string(node);
}

void store::lookup(std::string_view device,
                   std::function<void(found, record)> done) {
    auto key = device_key(device);
    redis_.command({"GET", key}, [done = std::move(done)](redisReply* r) {
        if (!r || redis::reply_is_error(r)) return done(found::unavailable, {});
        if (redis::reply_is_nil(r)) return done(found::no, {});
        auto rec = parse_record(redis::reply_text(r));
        if (!rec) return done(found::no, {});
        done(found::yes, std::move(*rec));
    });
}

void store::put(std::string_view device, const record& r,
                std::chrono::milliseconds ttl,
                std::function<void(found, record)> done) {
    auto key = device_key(device);
    auto value = format_record(r);
    auto ms = std::to_string(ttl.count());
    redis_.eval(put_script, put_sha, {key}, {value, ms},
                [done = std::move(done)](redisReply* r) {
                    if (!r || redis::reply_is_error(r)) {
                        return done(found::unavailable, {});
                    }
                    if (redis::reply_is_nil(r)) return done(found::no, {});
                    auto old = parse_record(redis::reply_text(r));
                    if (!old) return done(found::no, {});
                    done(found::yes, std::move(*old));
                });
}

void store::remove(std::string_view device, const record& r) {
    auto key = device_key(device);
    auto owner = owner_prefix(r.node, r.peer, r.conn);
    redis_.eval(remove_script, remove_sha, {key}, {owner},
                [](redisReply*) {});
}

void store::refresh(std::string_view device, const record& r,
                    std::chrono::milliseconds ttl,
                    std::function<void(int, std::optional<record>)> done) {
    auto key = device_key(device);
    auto owner = owner_prefix(r.node, r.peer, r.conn);
    auto value = format_record(r);
    auto ms = std::to_string(ttl.count());
    auto node = r.node + '\t';
    auto at = std::to_string(r.connected_at);
    redis_.eval(refresh_script, refresh_sha, {key},
                {owner, value, ms, node, at},
                [done = std::move(done)](redisReply* r) {
                    if (!r || redis::reply_is_error(r)) {
                        return done(-1, std::nullopt);
                    }
                    if (r->type == REDIS_REPLY_STRING) {
                        return done(3, parse_record(redis::reply_text(r)));
                    }
                    done(static_cast<int>(redis::reply_integer(r)),
                         std::nullopt);
                });
}

void store::put_node(std::string_view node, std::string_view peer,
                     std::chrono::milliseconds ttl) {
    auto key = node_key(node);
    auto ms = std::to_string(ttl.count());
    redis_.command({"SET", key, peer, "PX", ms}, [](redisReply*) {});
}

void store::remove_node(std::string_view node) {
    auto key = node_key(node);
    redis_.command({"DEL", key}, [](redisReply*) {});
}

}  // namespace pushy::registry
