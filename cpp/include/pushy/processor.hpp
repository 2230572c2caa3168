// The message processor of indirect push: consumes the queue's shards (Redis
// Streams) with a consumer group, delivers each message through direct push
// (registry lookup, peer link to the device's node), acknowledges it when
// the device has it, retries with backoff while the device is away, and
// moves expired or undeliverable messages to the dead-letter stream.
//
// Delivery is at least once: an entry is acknowledged (XACK, then XDEL)
// only after the node answered 200, so a processor that dies between the
// delivery and the acknowledgement leaves the entry pending, and another
// processor (or this one, restarted with the same consumer name) delivers
// it again with the same message id.
//
// Threading: the processor runs its own io thread. Every public call may
// come from any thread and does not block, except stop().
#pragma once

#include <cstdint>
#include <memory>
#include <string>

namespace pushy {

struct processor_config {
    std::string redis;  // Redis URL of the registry and the queue
    std::string prefix = "pushy:";
    std::string group = "processors";
    // Empty: "<host>-<pid>". Processors of one group need distinct names;
    // a processor restarted with its old name resumes its pending entries.
    std::string consumer;
    unsigned shards = 4;
    // Entries read per XREADGROUP. Reading pauses while max_in_flight
    // messages are being delivered, or max_waiting wait for a retry (an
    // offline device's messages never hold up the others' below that).
    unsigned batch = 256;
    unsigned max_in_flight = 10000;
    unsigned max_waiting = 100000;
    // An entry pending this long on another consumer is claimed (that
    // consumer is taken for dead). This processor keeps its own entries
    // younger than that while it holds them.
    double claim_idle_s = 30;
    // Backoff between attempts while the device is away: from retry_min_s,
    // doubling, at most retry_max_s (each with up to 20% jitter).
    double retry_min_s = 0.1;
    double retry_max_s = 5;
    // Wait for the node's answer beyond the message's ack wait.
    double push_timeout_s = 10;
    // A message that asks for the device's ack waits this long for it.
    double ack_timeout_s = 5;
    // Route cache TTL (device -> node), as on the nodes.
    double route_cache_ttl_s = 10;
    // Dead-letter stream: trimmed to about this many entries.
    std::size_t dead_maxlen = 1000000;

    // Throws config_error naming the first invalid field.
    void validate() const;
};

struct processor_stats {
    std::uint64_t read = 0;         // entries read from the shards
    std::uint64_t claimed = 0;      // entries claimed from other consumers
    std::uint64_t attempts = 0;     // delivery attempts
    std::uint64_t delivered = 0;    // acknowledged after a 200
    std::uint64_t retried = 0;      // attempts that will be tried again
    std::uint64_t expired = 0;      // dead-lettered: past their expiry
    std::uint64_t undeliverable = 0;  // dead-lettered: permanent failure
    std::uint64_t malformed = 0;    // dead-lettered: not a message
    std::uint64_t redis_errors = 0; // commands without an answer
    std::uint64_t in_flight = 0;    // now: held (delivering or waiting)
    std::uint64_t waiting = 0;      // now: waiting for their next attempt
    bool redis_up = false;
};

class processor_impl;

class message_processor {
public:
    // Checks the configuration (config_error) and that Redis accepts our
    // credentials (config_error); an unreachable Redis is only a warning.
    explicit message_processor(processor_config cfg);
    ~message_processor();
    message_processor(const message_processor&) = delete;
    message_processor& operator=(const message_processor&) = delete;

    // Starts the thread: creates the group where missing, re-reads this
    // consumer's own pending entries, then reads new ones.
    void start();
    // Stops reading and the thread. Messages held are left pending in
    // their streams (another processor claims them, or this consumer
    // re-reads them when it starts again). Idempotent.
    void stop();

    bool running() const noexcept;
    const std::string& consumer() const noexcept;
    processor_stats stats() const;

private:
    std::unique_ptr<processor_impl> impl_;
};

}  // namespace pushy
