// Unit tests of the connection table's ownership rules.
#include <doctest/doctest.h>

#include "core/connection_table.hpp"

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
