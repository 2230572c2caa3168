// The push library of services: direct push to a device on whichever node
// holds it, found through the Redis registry (route cache first), sent
// over a peer link, answered with a typed delivery status.
//
// Threading: the client runs its own io thread. push_async() may be called
// from any thread; its callback runs on the client's thread and must not
// block. push() and push_many() block the calling thread (never the
// client's thread).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace pushy {

struct push_result {
    int code = 0;        // 200 delivered, 404 not connected, 503, 504, ...
    std::string status;  // "delivered", "not_connected", ...
    std::string node;    // the node that answered (empty: answered here)
    std::uint64_t id = 0;  // the push id the node gave, 0 when none
    std::string reason;
    double latency_s = 0;  // from the call to the answer
};

struct push_spec_in {
    std::string device;
    std::string data;  // JSON text
    bool want_ack = false;
    double timeout_s = 0;  // 0: the node's push_timeout_s
    std::string from = "api";
};

// A message for the queue (indirect push): delivered by a message
// processor as soon as the device is reachable, until `ttl_s` has passed.
struct enqueue_spec {
    std::string device;
    std::string data;  // JSON text
    std::string id;    // the message id; empty: a random one
    double ttl_s = 300;
    bool want_ack = false;  // delivered only once the device acks
    std::string from = "api";
    unsigned shards = 4;  // the queue's shard count, as the processors use
};

struct enqueue_result {
    int code = 0;        // 202 accepted, 400 bad message, 503 no Redis
    std::string status;  // "accepted", "bad_request", "unavailable"
    std::string id;      // the message id
    std::string entry;   // the stream entry id
    std::string reason;
};

class push_client_impl;

class push_client {
public:
    // Connects to Redis at `redis_url` (keys under `prefix`). Throws
    // config_error for a malformed URL or refused credentials; an
    // unreachable server is retried in the background (pushes answer 503
    // meanwhile). `timeout_s` bounds every push beyond its ack timeout.
    push_client(const std::string& redis_url, const std::string& prefix,
                double timeout_s);
    ~push_client();
    push_client(const push_client&) = delete;
    push_client& operator=(const push_client&) = delete;

    void push_async(push_spec_in spec, std::function<void(push_result)> done);
    push_result push(push_spec_in spec);
    std::vector<push_result> push_many(std::vector<push_spec_in> specs);

    // Appends a message to its shard of the queue; `done` runs on the
    // client's thread once Redis has it (202) or could not take it.
    void enqueue_async(enqueue_spec spec,
                       std::function<void(enqueue_result)> done);
    enqueue_result enqueue(enqueue_spec spec);
    std::vector<enqueue_result> enqueue_many(std::vector<enqueue_spec> specs);

    // True while the Redis link is up.
    bool connected() const;
    // Route cache hits and misses so far.
    std::uint64_t cache_hits() const;
    std::uint64_t cache_misses() const;

    // Sends an event frame to a device on whichever node holds it (peer
    // kind 4): `frame_json` is a whole JSON object with "t":"event", which
    // the node writes to the device as it is. With `conn` not 0 only that
    // connection of the device gets it (404 "connection is gone"
    // otherwise). Answered like a push: 200 written, 400 (not such a
    // frame; answered here), 404, 503, 504. Threading as push_async().
    void send_event_async(std::string device, std::string frame_json,
                          std::uint64_t conn,
                          std::function<void(push_result)> done);
    push_result send_event(std::string device, std::string frame_json,
                           std::uint64_t conn = 0);

    // Stops the thread; pending pushes are answered 503. Idempotent.
    void close();

private:
    std::unique_ptr<push_client_impl> impl_;
};

}  // namespace pushy
