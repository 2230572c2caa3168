// The node's connection table: device id -> its live connection.
//
// Sharded by the hash of the device id, each shard behind its own mutex, so
// concurrent lookups from push threads and registrations from io threads
// rarely meet. The table holds a strong reference to each session; a session
// removes itself when it closes, only if it is still the one registered.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace pushy {

class session;

class connection_table {
public:
    // Looks a device up. Returns null when it is not connected here.
    std::shared_ptr<session> find(std::string_view device) const;

    // Registers `s`, connection number `conn`, under `device`. Returns the
    // session it replaced (to be closed with 4001 by the caller), or null.
    // Sets `*kicked` when a newer connection elsewhere superseded `conn`
    // before it got here (see supersede()): the caller closes it with 4001.
    std::shared_ptr<session> insert(const std::string& device,
                                    std::shared_ptr<session> s,
                                    std::uint64_t conn = 0,
                                    bool* kicked = nullptr);

    // A newer connection of `device` on another node supersedes connection
    // `conn` of this node. Returns that session when it is the live one (the
    // caller closes it with 4001), else null and remembers `conn` for a
    // while: its registry write can finish, and the other node's kick
    // arrive, before the session enters the table. `id_of` reads a
    // session's connection number.
    std::shared_ptr<session> supersede(std::string_view device,
                                       std::uint64_t conn,
                                       std::uint64_t (*id_of)(const session&));

    // Removes `device` only if it maps to `s`. Returns true if removed.
    bool remove(std::string_view device, const session* s);

    // Copies every registered session (for shutdown and drain).
    std::vector<std::shared_ptr<session>> snapshot() const;

    // Drops every entry (after the io threads have stopped).
    void clear();

    std::size_t size() const noexcept {
        return size_.load(std::memory_order_relaxed);
    }

private:
    struct string_hash {
        using is_transparent = void;
        std::size_t operator()(std::string_view s) const noexcept {
            return std::hash<std::string_view>{}(s);
        }
    };
    using clock = std::chrono::steady_clock;
    struct shard {
        mutable std::mutex mutex;
        std::unordered_map<std::string, std::shared_ptr<session>,
                           string_hash, std::equal_to<>>
            map;
        // Connections superseded before they entered the table, and when.
        // Almost always empty; bounded by age and count.
        std::vector<std::pair<std::uint64_t, clock::time_point>> kicked;
    };
    static constexpr std::size_t shard_count = 64;

    shard& shard_for(std::string_view device) const;

    mutable std::array<shard, shard_count> shards_;
    std::atomic<std::size_t> size_{0};
};

}  // namespace pushy
