// Joins concurrent lookups of one key: the first caller asks the store, the
// others wait for the same answer and all get it in the order they came.
// Besides saving store calls, this keeps the order of messages that need
// the same lookup (a later one would otherwise overtake an earlier one
// whose lookup is still in flight).
//
// Threading: single-threaded; every call on one thread (or strand).
#pragma once

#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace pushy::detail {

template <class Callback>
class single_flight {
public:
    // Queues `done` behind the lookup of `key` in flight and returns true,
    // or returns false (and keeps nothing) when none is in flight.
    bool join(const std::string& key, Callback& done) {
        auto it = waiting_.find(key);
        if (it == waiting_.end()) return false;
        it->second.push_back(std::move(done));
        return true;
    }

    // Starts a lookup of `key` whose first waiter is `done`.
    void start(const std::string& key, Callback done) {
        waiting_[key].push_back(std::move(done));
    }

    // Ends the lookup of `key`; returns its waiters, in order.
    std::vector<Callback> finish(const std::string& key) {
        auto node = waiting_.extract(key);
        return node ? std::move(node.mapped()) : std::vector<Callback>{};
    }

private:
    std::unordered_map<std::string, std::vector<Callback>> waiting_;
};

}  // namespace pushy::detail
