#include "core/connection_table.hpp"

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

std::shared_ptr<session> connection_table::insert(const std::string& device,
                                                  std::shared_ptr<session> s) {
    auto& sh = shard_for(device);
    std::lock_guard lock(sh.mutex);
    auto [it, added] = sh.map.try_emplace(device, s);
    if (added) {
        size_.fetch_add(1, std::memory_order_relaxed);
        return nullptr;
    }
    std::swap(it->second, s);
    return s;
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
