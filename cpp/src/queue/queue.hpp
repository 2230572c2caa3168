// The message queue of indirect push (DESIGN section 5): sharded Redis
// Streams that services append to and message processors consume with a
// consumer group.
//
// Keys, under the deployment's prefix:
//   {prefix}q:<n>     shard n of the queue (n < shards); a device's
//                     messages always go to one shard, so they keep order
//   {prefix}q:dead    dead letters: messages expired or undeliverable
// An entry's fields: id, device, data (JSON text), ack ("written" or
// "client"), exp (ms since the epoch after which it is not delivered),
// from (service name), enq (ms since the epoch when it was enqueued).
// Dead letters add reason and attempts.
//
// Free of I/O, except where it takes a redisReply to read.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

struct redisReply;

namespace pushy::queue {

// The consumer group of the message processors.
inline constexpr std::string_view default_group = "processors";

// Shard `n` of the queue.
std::string shard_key(std::string_view prefix, unsigned n);
// The dead-letter stream.
std::string dead_key(std::string_view prefix);

// The shard of `device`'s messages: CRC-32 of the id (as zlib computes
// it) modulo `shards`.
unsigned shard_of(std::string_view device, unsigned shards) noexcept;

// A message id for a message enqueued without one: 32 random hex digits.
std::string random_id();

struct message {
    std::string id;
    std::string device;
    std::string data;  // JSON text
    bool want_ack = false;
    std::uint64_t expires_ms = 0;  // wall clock
    std::string from;
    std::uint64_t enqueued_ms = 0;
};

// The field/value pairs of `m`, as XADD takes them after the entry id.
std::vector<std::string> fields_of(const message& m);

// One entry read from a stream.
struct entry {
    std::string stream;    // the key it was read from
    std::string entry_id;  // the stream's id, "ms-seq"
    // The message, or none when the entry was deleted (a pending entry
    // whose fields are gone) or is malformed (`error` says why).
    std::optional<message> msg;
    std::string error;
    // Every field as read, for a dead letter of a malformed entry.
    std::vector<std::pair<std::string, std::string>> raw;
};

// Reads the entries of an XREADGROUP reply (an array of [stream, entries])
// into `out`. Returns false when the reply is not of that shape.
bool parse_read_reply(const redisReply* r, std::vector<entry>& out);

// Reads an XAUTOCLAIM reply ([cursor, entries, deleted ids]) for `stream`
// into `out` and sets `cursor`. Deleted entries come back with no message.
bool parse_claim_reply(const redisReply* r, const std::string& stream,
                       std::string& cursor, std::vector<entry>& out);

// Parses the fields of an entry (a flat array of field, value).
void parse_fields(const redisReply* fields, entry& e);

}  // namespace pushy::queue
