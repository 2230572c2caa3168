// The Push Registry on Redis: device id -> the node and connection holding
// it (DESIGN section 5).
//
// Keys, under a configurable prefix (default "pushy:"):
//   {prefix}dev:{<device>}  the device record, with a TTL; the braces are a
//                           Redis Cluster hash tag, so every per-device key
//                           lives on the device's slot
//   {prefix}node:<id>       the node directory entry: its peer address
// A record is "node \t peer \t conn \t connected_at \t account". Only the
// connection that wrote it may delete it (compare-and-delete in Lua).
//
// Threading: every member runs on the io_context of the Redis client.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>

#include "registry/redis_client.hpp"

namespace pushy::registry {

struct record {
    std::string node;
    std::string peer;  // "host:port" of the node's peer link
    std::uint64_t conn = 0;
    std::int64_t connected_at = 0;  // Unix seconds
    std::string account;
};

std::string format_record(const record& r);
std::optional<record> parse_record(std::string_view text);

// The first bytes of every record written by connection `conn` of `node`:
// what compare-and-delete compares.
std::string owner_prefix(std::string_view node, std::string_view peer,
                         std::uint64_t conn);

enum class found { yes, no, unavailable };

class store {
public:
    store(redis::client& redis, std::string prefix);

    std::string device_key(std::string_view device) const;
    std::string node_key(std::string_view node) const;

    // Where `device` is. `unavailable` when Redis cannot answer.
    void lookup(std::string_view device,
                std::function<void(found, record)> done);

    // Writes `r` for `device` with `ttl`, returning the record it replaced
    // (found::no when there was none).
    void put(std::string_view device, const record& r,
             std::chrono::milliseconds ttl,
             std::function<void(found, record)> done);

    // Deletes the record of `device` if connection `r.conn` of `r.node`
    // still owns it.
    void remove(std::string_view device, const record& r);

    // Extends the TTL of `device`'s record if `r` owns it; writes it again
    // if it is gone (Redis restarted or it expired). `done` gets 1 (owned,
    // extended), 2 (written again), 3 (taken over from the older record it
    // also gets: one of this node, or an older connection elsewhere whose
    // delete was lost), 0 (a newer connection elsewhere owns it) or -1 (no
    // answer).
    void refresh(std::string_view device, const record& r,
                 std::chrono::milliseconds ttl,
                 std::function<void(int, std::optional<record>)> done);

    // The node directory.
    void put_node(std::string_view node, std::string_view peer,
                  std::chrono::milliseconds ttl);
    void remove_node(std::string_view node);

    redis::client& redis() noexcept { return redis_; }

private:
    redis::client& redis_;
    std::string prefix_;
};

}  // namespace pushy::registry
