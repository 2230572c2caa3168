// Direct push across nodes: find the device's node (route cache, then the
// registry) and send the push over a peer link.
//
// A route that led to a node where the device is not (404/409) is evicted
// and looked up once more in the registry; routes otherwise live for
// `cache_ttl`. Used by every node (pushes for devices elsewhere) and by the
// C++ push client.
//
// Threading: every member runs on the io_context of the registry's Redis
// client.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <cstdint>
#include <string>
#include <unordered_map>

#include "detail/single_flight.hpp"
#include "registry/registry.hpp"
#include "routing/peer_client.hpp"

namespace pushy::routing {

struct route {
    std::string node;
    std::string peer;
    std::string account;
    std::chrono::steady_clock::time_point expires;
};

// device id -> route, bounded, with a TTL. Single-threaded.
class route_cache {
public:
    route_cache(std::size_t max_entries, std::chrono::milliseconds ttl)
        : max_(max_entries), ttl_(ttl) {}

    // The device's route while it is fresh, or null (a miss).
    const route* find(const std::string& device);
    // The device's route even if it is older than the TTL, or null. For
    // when the registry cannot answer: a stale route is corrected by the
    // 404/409 of the node it leads to.
    const route* find_stale(const std::string& device) const;
    void put(const std::string& device, std::string node, std::string peer,
             std::string account);
    void evict(const std::string& device) { map_.erase(device); }

    // Written on the router's thread only; read from any.
    std::atomic<std::uint64_t> hits{0};
    std::atomic<std::uint64_t> misses{0};

private:
    std::unordered_map<std::string, route> map_;
    std::size_t max_;
    std::chrono::milliseconds ttl_;
};

class router {
public:
    // `self` is the id of the node this router runs in (routes to it are
    // answered 404 at once: the caller has already looked locally), or
    // empty in a push client.
    router(boost::asio::io_context& ioc, registry::store& store,
           std::string self,
           std::chrono::milliseconds cache_ttl = std::chrono::seconds(10));

    // Sends `req` (a push) to the device's node; `done` runs once.
    void push(peer::request req, std::chrono::milliseconds timeout,
              peer::reply_fn done);

    // Finds the device's route: the cache, or the registry when not cached
    // (or no longer fresh). `done` gets found::yes with the route,
    // found::no, or found::unavailable (Redis cannot answer and no route
    // was ever cached; a stale one is used while Redis is away).
    using resolve_fn = std::function<void(registry::found, const route&)>;
    void resolve(const std::string& device, resolve_fn done);

    // Sends `req` along `r` (from resolve()); a 404/409 from that node
    // evicts the route and tries once more with a fresh lookup.
    void send_via(const route& r, peer::request req,
                  std::chrono::milliseconds timeout, peer::reply_fn done) {
        send_to(r.node, r.peer, std::move(req), timeout, std::move(done),
                false);
    }

    // Asks the node at `peer` to close connection `conn` of `device` (4001).
    void kick(const std::string& peer, const std::string& device,
              std::uint64_t conn);

    void stop() { pool_.stop(); }

    route_cache& cache() noexcept { return cache_; }

    // Registry lookups resolve() has made (the d2d path's store calls).
    // Written on the router's thread only; read from any.
    std::atomic<std::uint64_t> resolve_lookups{0};

private:
    void attempt(peer::request req, std::chrono::milliseconds timeout,
                 peer::reply_fn done, bool fresh);
    void send_to(const std::string& node, const std::string& peer,
                 peer::request req, std::chrono::milliseconds timeout,
                 peer::reply_fn done, bool fresh);

    registry::store& store_;
    std::string self_;
    peer::client_pool pool_;
    route_cache cache_;
    detail::single_flight<resolve_fn> resolving_;
};

}  // namespace pushy::routing
