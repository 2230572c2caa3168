// Unit tests of the queue's keys, shards and stream entries.
#include <doctest/doctest.h>

#include <hiredis/hiredis.h>

#include <deque>
#include <string>
#include <vector>

#include "queue/queue.hpp"

using namespace pushy;

namespace {

// Builds hiredis reply trees by hand, as the parser meets them.
struct replies {
    std::deque<redisReply> nodes;
    std::deque<std::vector<redisReply*>> arrays;
    std::deque<std::string> texts;

    redisReply* str(std::string s) {
        texts.push_back(std::move(s));
        redisReply& r = nodes.emplace_back();
        r.type = REDIS_REPLY_STRING;
        r.str = texts.back().data();
        r.len = texts.back().size();
        return &r;
    }
    redisReply* nil() {
        redisReply& r = nodes.emplace_back();
        r.type = REDIS_REPLY_NIL;
        return &r;
    }
    redisReply* arr(std::vector<redisReply*> items) {
        arrays.push_back(std::move(items));
        redisReply& r = nodes.emplace_back();
        r.type = REDIS_REPLY_ARRAY;
        r.elements = arrays.back().size();
        r.element = arrays.back().data();
        return &r;
    }
    redisReply* fields(const std::vector<std::string>& kv) {
        std::vector<redisReply*> items;
        for (auto& s : kv) items.push_back(str(s));
        return arr(items);
    }
};

}  // namespace

TEST_CASE("a device's messages go to one shard, as zlib's CRC-32 picks it") {
    // zlib.crc32(b"tv-1") == 3834750688.
    CHECK(queue::shard_of("tv-1", 4) == 3834750688u % 4);
    CHECK(queue::shard_of("tv-1", 7) == 3834750688u % 7);
    CHECK(queue::shard_of("tv-1", 1) == 0);
    CHECK(queue::shard_key("pushy:", 3) == "pushy:q:3");
    CHECK(queue::dead_key("app:") == "app:q:dead");
}

TEST_CASE("random message ids are 32 hex digits and differ") {
    auto a = queue::random_id(), b = queue::random_id();
    CHECK(a.size() == 32);
    CHECK(a.find_first_not_of("0123456789abcdef") == std::string::npos);
    CHECK(a != b);
}

TEST_CASE("a message's fields read back as the message") {
    queue::message m;
    m.id = "m-1";
    m.device = "tv-1";
    m.data = R"({"a":1})";
    m.want_ack = true;
    m.expires_ms = 1'790'000'000'000;
    m.from = "billing";
    m.enqueued_ms = 1'789'999'999'000;
    replies R;
    queue::entry e;
    queue::parse_fields(R.fields(queue::fields_of(m)), e);
    REQUIRE(e.msg);
    CHECK(e.error.empty());
    CHECK(e.msg->id == "m-1");
    CHECK(e.msg->device == "tv-1");
    CHECK(e.msg->data == R"({"a":1})");
    CHECK(e.msg->want_ack);
    CHECK(e.msg->expires_ms == m.expires_ms);
    CHECK(e.msg->from == "billing");
    CHECK(e.msg->enqueued_ms == m.enqueued_ms);
    CHECK(e.raw.size() == 7);
}

TEST_CASE("entries without the needed fields are malformed, saying which") {
    replies R;
    auto check = [&](std::vector<std::string> kv, const char* why) {
        queue::entry e;
        queue::parse_fields(R.fields(kv), e);
        CHECK_FALSE(e.msg);
        CHECK(e.error == why);
    };
    check({"device", "tv", "data", "1", "exp", "5"}, "no 'id' field");
    check({"id", "m", "data", "1", "exp", "5"}, "no valid 'device' field");
    check({"id", "m", "device", std::string(257, 'd'), "data", "1", "exp", "5"},
          "no valid 'device' field");
    check({"id", "m", "device", "tv", "exp", "5"}, "no 'data' field");
    check({"id", "m", "device", "tv", "data", "1", "exp", "soon"},
          "no valid 'exp' field");
    check({"id", "m", "device", "tv", "data", "{not json", "exp", "5"},
          "'data' is not valid JSON");
    check({"id", "m", "device", "tv", "data", "1", "exp", "5", "ack", "maybe"},
          "'ack' is neither 'written' nor 'client'");
    // A message without `from` comes from the queue; `ack` is written.
    queue::entry e;
    queue::parse_fields(R.fields({"id", "m", "device", "tv", "data", "1",
                                  "exp", "5"}),
                        e);
    REQUIRE(e.msg);
    CHECK(e.msg->from == "queue");
    CHECK_FALSE(e.msg->want_ack);
}

TEST_CASE("an XREADGROUP reply yields its entries, deleted ones without") {
    replies R;
    auto* s0 = R.arr({R.str("pushy:q:0"),
                      R.arr({R.arr({R.str("1-0"),
                                    R.fields({"id", "a", "device", "tv",
                                              "data", "1", "exp", "9"})}),
                             R.arr({R.str("2-0"), R.nil()})})});
    auto* s1 = R.arr({R.str("pushy:q:1"), R.arr({})});
    std::vector<queue::entry> out;
    REQUIRE(queue::parse_read_reply(R.arr({s0, s1}), out));
    REQUIRE(out.size() == 2);
    CHECK(out[0].stream == "pushy:q:0");
    CHECK(out[0].entry_id == "1-0");
    REQUIRE(out[0].msg);
    CHECK(out[0].msg->id == "a");
    CHECK(out[1].entry_id == "2-0");
    CHECK_FALSE(out[1].msg);
    CHECK(out[1].error.empty());

    std::vector<queue::entry> none;
    CHECK(queue::parse_read_reply(R.nil(), none));  // BLOCK timed out
    CHECK(none.empty());
    CHECK_FALSE(queue::parse_read_reply(R.str("OK"), none));
    CHECK_FALSE(queue::parse_read_reply(nullptr, none));
}

TEST_CASE("an XAUTOCLAIM reply yields its cursor, entries and deleted ids") {
    replies R;
    auto* reply = R.arr(
        {R.str("5-0"),
         R.arr({R.arr({R.str("3-0"), R.fields({"id", "b", "device", "tv",
                                               "data", "2", "exp", "9"})})}),
         R.arr({R.str("4-0")})});
    std::string cursor;
    std::vector<queue::entry> out;
    REQUIRE(queue::parse_claim_reply(reply, "pushy:q:2", cursor, out));
    CHECK(cursor == "5-0");
    REQUIRE(out.size() == 2);
    CHECK(out[0].stream == "pushy:q:2");
    REQUIRE(out[0].msg);
    CHECK(out[0].msg->id == "b");
    CHECK(out[1].entry_id == "4-0");
    CHECK_FALSE(out[1].msg);
    CHECK_FALSE(queue::parse_claim_reply(R.str("x"), "s", cursor, out));
}
