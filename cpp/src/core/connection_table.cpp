#include "core/connection_table.hpp"

#include <algorithm>

namespace pushy {

// Picks the shard by the high bits of the hash: the map inside uses the low
// ones for its buckets.
connection_table::shard& connection_table::shard_for(
    std::string_view device) const {
    std::size_t h = string_hash{}(device);
    return shards_[(h >> 32 ^ h >> 16) % shard_count];
}

std::shared_ptr<session> connection_table::find(
    std::string_view device) const {
    auto& sh = shard_for(device);
    std::lock_guard lock(sh.mutex);
    auto it = sh.map.find(device);
    return it == sh.map.end() ? nullptr : it->second;
}

namespace {

// How long, and how many per shard, early kicks are remembered. A session
// enters the table within milliseconds of its registry write; a kick older
// than this is for a connection that ended before it began.
constexpr auto kick_memory = std::chrono::seconds(30);
constexpr std::size_t max_kicks_per_shard = 256;

}  // namespace

std::shared_ptr<session> connection_table::insert(const std::string& device,
                                                  std::shared_ptr<session> s,
                                                  std::uint64_t conn,
                                                  bool* kicked) {
    auto& sh = shard_for(device);
    std::lock_guard lock(sh.mutex);
    if (kicked) {
        auto k = std::find_if(sh.kicked.begin(), sh.kicked.end(),
                              [conn](const auto& e) { return e.first == conn; });
        *kicked = k != sh.kicked.end();
        if (*kicked) sh.kicked.erase(k);
    }
    auto [it, added] = sh.map.try_emplace(device, s);
    if (added) {
        size_.fetch_add(1, std::memory_order_relaxed);
        return nullptr;
    }
    std::swap(it->second, s);
    return s;
}

std::shared_ptr<session> connection_table::supersede(
    std::string_view device, std::uint64_t conn,
    std::uint64_t (*id_of)(const session&)) {
    auto& sh = shard_for(device);
    std::lock_guard lock(sh.mutex);
    auto it = sh.map.find(device);
    if (it != sh.map.end() && id_of(*it->second) == conn) return it->second;
    // Not (yet) the live one: remember it, forgetting what is too old.
    auto now = clock::now();
    std::erase_if(sh.kicked, [now](const auto& e) {
        return now - e.second > kick_memory;
    });
    if (sh.kicked.size() >= max_kicks_per_shard) {
        sh.kicked.erase(sh.kicked.begin());
    }
    sh.kicked.emplace_back(conn, now);
    return nullptr;
}

bool connection_table::remove(std::string_view device, const session* s) {
    auto& sh = shard_for(device);
    std::lock_guard lock(sh.mutex);
    auto it = sh.map.find(device);
    if (it == sh.map.end() || it->second.get() != s) return false;
    sh.map.erase(it);
    size_.fetch_sub(1, std::memory_order_relaxed);
    return true;
}

std::vector<std::shared_ptr<session>> connection_table::snapshot() const {
    std::vector<std::shared_ptr<session>> out;
    out.reserve(size());
    for (auto& sh : shards_) {
        std::lock_guard lock(sh.mutex);
        for (auto& [k, v] : sh.map) out.push_back(v);
    }
    return out;
}

void connection_table::clear() {
    for (auto& sh : shards_) {
        std::lock_guard lock(sh.mutex);
        sh.map.clear();
    }
    size_.store(0, std::memory_order_relaxed);
}

}  // namespace pushy
