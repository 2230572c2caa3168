// Unit tests of the connection table's ownership rules.
#include <doctest/doctest.h>

#include "core/connection_table.hpp"

#include <map>

namespace pushy {
// The table only stores and compares pointers; a stand-in type is enough.
class session {};
}  // namespace pushy

using pushy::connection_table;
using pushy::session;

TEST_CASE("insert returns the superseded session") {
    connection_table t;
    auto a = std::make_shared<session>();
    auto b = std::make_shared<session>();
    CHECK(t.insert("d1", a) == nullptr);
    CHECK(t.size() == 1);
    CHECK(t.find("d1") == a);
    CHECK(t.insert("d1", b) == a);
    CHECK(t.size() == 1);
    CHECK(t.find("d1") == b);
}

TEST_CASE("only the owning session removes the entry") {
    connection_table t;
    auto a = std::make_shared<session>();
    auto b = std::make_shared<session>();
    t.insert("d1", a);
    t.insert("d1", b);
    // The older connection's late cleanup leaves the newer one alone.
    CHECK_FALSE(t.remove("d1", a.get()));
    CHECK(t.find("d1") == b);
    CHECK(t.remove("d1", b.get()));
    CHECK(t.find("d1") == nullptr);
    CHECK(t.size() == 0);
}

TEST_CASE("snapshot and clear cover every shard") {
    connection_table t;
    std::vector<std::shared_ptr<session>> all;
    for (int i = 0; i < 500; ++i) {
        all.push_back(std::make_shared<session>());
        t.insert("device-" + std::to_string(i), all.back());
    }
    CHECK(t.size() == 500);
    CHECK(t.snapshot().size() == 500);
    t.clear();
    CHECK(t.size() == 0);
    CHECK(t.find("device-7") == nullptr);
}

namespace {
// Connection numbers of the stand-in sessions, by address.
std::uint64_t id_in_test(const session& s);
std::map<const session*, std::uint64_t> test_ids;
std::uint64_t id_in_test(const session& s) { return test_ids.at(&s); }
}  // namespace

TEST_CASE("a kick for the live connection returns it") {
    connection_table t;
    auto a = std::make_shared<session>();
    test_ids[a.get()] = 7;
    t.insert("d1", a, 7);
    CHECK(t.supersede("d1", 7, id_in_test) == a);
    CHECK(t.supersede("d1", 6, id_in_test) == nullptr);
}

TEST_CASE("a kick that arrives before its connection is kept for it") {
    connection_table t;
    auto old = std::make_shared<session>();
    test_ids[old.get()] = 1;
    t.insert("d1", old, 1);
    // Connection 2 is kicked while connection 1 still holds the entry.
    CHECK(t.supersede("d1", 2, id_in_test) == nullptr);
    bool kicked = false;
    auto next = std::make_shared<session>();
    CHECK(t.insert("d1", next, 2, &kicked) == old);
    CHECK(kicked);
    // The kick is used once: a later connection 3 starts normally.
    kicked = true;
    t.insert("d1", std::make_shared<session>(), 3, &kicked);
    CHECK_FALSE(kicked);
}
