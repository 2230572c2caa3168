#include "routing/router.hpp"

#include <functional>

namespace pushy::routing {

using clock = std::chrono::steady_clock;

const route* route_cache::find(const std::string& device) {
    auto it = map_.find(device);
    // An expired entry stays (bounded by max_) for find_stale().
    if (it == map_.end() || it->second.expires <= clock::now()) {
        misses.store(misses.load(std::memory_order_relaxed) + 1,
                     std::memory_order_relaxed);
        return nullptr;
    }
    hits.store(hits.load(std::memory_order_relaxed) + 1,
               std::memory_order_relaxed);
    return &it->second;
}

const route* route_cache::find_stale(const std::string& device) const {
    auto it = map_.find(device);
    return it == map_.end() ? nullptr : &it->second;
}

void route_cache::put(const std::string& device, std::string node,
                      std::string peer, std::string account) {
    // Full: drop an arbitrary entry; a miss only costs one registry read.
    if (map_.size() >= max_ && !map_.count(device)) map_.erase(map_.begin());
    map_[device] = route{std::move(node), std::move(peer), std::move(account),
                         clock::now() + ttl_};
}

router::router(boost::asio::io_context& ioc, registry::store& store,
               std::string self, std::chrono::milliseconds cache_ttl)
    : store_(store), self_(std::move(self)), pool_(ioc),
      cache_(100000, cache_ttl) {}

void router::push(peer::request req, std::chrono::milliseconds timeout,
                  peer::reply_fn done) {
    attempt(std::move(req), timeout, std::move(done), false);
}

// Sends along the cached route, or looks the device up first. `fresh`
// means the route comes from the registry just now (no second try).
void router::attempt(peer::request req, std::chrono::milliseconds timeout,
                     peer::reply_fn done, bool fresh) {
    if (!fresh) {
        if (const route* r = cache_.find(req.device)) {
            return send_to(r->node, r->peer, std::move(req), timeout,
                           std::move(done), false);
        }
    }
    std::string device = req.device;
    store_.lookup(device, [this, req = std::move(req), timeout,
                           done = std::move(done)](registry::found f,
                                                   registry::record rec) mutable {
        if (f == registry::found::unavailable) {
            return done(peer::local_reply(503, "unavailable",
                                          "registry unavailable"));
        }
        if (f == registry::found::no) {
            return done(peer::local_reply(404, "not_connected",
                                          "device is not connected"));
        }
        cache_.put(req.device, rec.node, rec.peer, rec.account);
        send_to(rec.node, rec.peer, std::move(req), timeout, std::move(done),
                true);
    });
}

void router::send_to(const std::string& node, const std::string& peer,
                     peer::request req, std::chrono::milliseconds timeout,
                     peer::reply_fn done, bool fresh) {
    if (node == self_) {
        // The registry names this node, but the caller found no connection
        // here: the record is stale (the device is leaving).
        cache_.evict(req.device);
        return done(peer::local_reply(404, "not_connected",
                                      "device is not connected"));
    }
    // A cached route may be wrong: keep the request to try again.
    std::string device = req.device;
    auto retry = fresh ? peer::request{} : req;
    pool_.send(peer, std::move(req), timeout,
               [this, fresh, device = std::move(device),
                retry = std::move(retry), timeout,
                done = std::move(done)](const peer::reply& r) mutable {
                   bool stale = r.code == 404 || r.code == 409;
                   bool unreachable = r.code == 503 && r.node.empty();
                   if (!stale && !unreachable) return done(r);
                   cache_.evict(device);
                   if (fresh) return done(r);
                   // The route was cached: the device may have moved.
                   attempt(std::move(retry), timeout, std::move(done), true);
               });
}

void router::resolve(const std::string& device, resolve_fn done) {
    // Behind a lookup in flight, even if the cache would answer now.
    if (resolving_.join(device, done)) return;
    if (const route* r = cache_.find(device)) {
        return done(registry::found::yes, *r);
    }
    resolving_.start(device, std::move(done));
    resolve_lookups.store(resolve_lookups.load(std::memory_order_relaxed) + 1,
                          std::memory_order_relaxed);
    store_.lookup(device, [this, device](registry::found f,
                                         registry::record rec) {
        route r;
        if (f == registry::found::unavailable) {
            if (const route* stale = cache_.find_stale(device)) {
                f = registry::found::yes;
                r = *stale;
            }
        } else if (f == registry::found::yes) {
            cache_.put(device, rec.node, rec.peer, rec.account);
            r = route{rec.node, rec.peer, rec.account, {}};
        }
        for (auto& w : resolving_.finish(device)) w(f, r);
    });
}

void router::kick(const std::string& peer, const std::string& device,
                  std::uint64_t conn) {
    peer::request req;
    req.what = peer::kind::kick;
    req.device = device;
    req.conn = conn;
    pool_.send(peer, std::move(req), std::chrono::seconds(5),
               [](const peer::reply&) {});
}

}  // namespace pushy::routing
