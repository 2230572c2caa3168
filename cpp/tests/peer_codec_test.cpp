// Unit tests of the peer-link frames and the registry's record format.
#include <doctest/doctest.h>

#include "pushy/config.hpp"
#include "registry/redis_client.hpp"
#include "registry/registry.hpp"
#include "routing/peer_codec.hpp"

using namespace pushy;

TEST_CASE("a request and a reply survive encoding, byte by byte") {
    peer::request req;
    req.id = 42;
    req.device = "tv-\xc3\xa9";
    req.data = R"({"a":[1,2,{"b":null}]})";
    req.want_ack = true;
    req.timeout_ms = 1500;
    req.from = "billing";
    req.deadline_ms = 1'790'000'000'123;
    peer::reply rep;
    rep.id = 7;
    rep.code = 504;
    rep.status = "timeout";
    rep.node = "node-a";
    rep.push_id = 99;
    rep.reason = "device did not ack";
    std::string wire;
    peer::encode(wire, req);
    peer::encode(wire, rep);

    peer::frame_reader reader;
    peer::request got_req;
    peer::reply got_rep;
    // Fed one byte at a time: frames may arrive split anywhere.
    std::vector<peer::frame_reader::result> seen;
    for (char c : wire) {
        reader.feed(&c, 1);
        for (;;) {
            auto r = reader.next(got_req, got_rep);
            if (r == peer::frame_reader::result::none) break;
            seen.push_back(r);
        }
    }
    REQUIRE(seen.size() == 2);
    CHECK(seen[0] == peer::frame_reader::result::request);
    CHECK(seen[1] == peer::frame_reader::result::reply);
    CHECK(got_req.id == 42);
    CHECK(got_req.what == peer::kind::push);
    CHECK(got_req.device == req.device);
    CHECK(got_req.data == req.data);
    CHECK(got_req.want_ack);
    CHECK(got_req.timeout_ms == 1500);
    CHECK(got_req.from == "billing");
    CHECK(got_req.deadline_ms == 1'790'000'000'123);
    CHECK(got_rep.id == 7);
    CHECK(got_rep.code == 504);
    CHECK(got_rep.status == "timeout");
    CHECK(got_rep.node == "node-a");
    CHECK(got_rep.push_id == 99);
    CHECK(got_rep.reason == "device did not ack");
}

TEST_CASE("a corrupt or oversized frame is an error, not a crash") {
    peer::request req;
    peer::reply rep;
    {
        peer::frame_reader reader;
        const char huge[] = {'\x7f', '\x00', '\x00', '\x00'};
        reader.feed(huge, 4);
        CHECK(reader.next(req, rep) == peer::frame_reader::result::error);
    }
    {
        peer::frame_reader reader;
        const char junk[] = {'\x00', '\x00', '\x00', '\x02', '\xc1', '\xc1'};
        reader.feed(junk, sizeof junk);
        CHECK(reader.next(req, rep) == peer::frame_reader::result::error);
    }
    {
        // A well-formed msgpack value that is not a frame: the integer 5.
        peer::frame_reader reader;
        const char five[] = {'\x00', '\x00', '\x00', '\x01', '\x05'};
        reader.feed(five, sizeof five);
        CHECK(reader.next(req, rep) == peer::frame_reader::result::error);
    }
}

// Encodes `req` alone and decodes it into `got`; returns what the reader
// made of the frame.
static peer::frame_reader::result round_trip(const peer::request& req,
                                             peer::request& got) {
    std::string wire;
    peer::encode(wire, req);
    peer::frame_reader reader;
    reader.feed(wire.data(), wire.size());
    peer::reply rep;
    return reader.next(got, rep);
}

TEST_CASE("an event request keeps its frame text and connection number") {
    peer::request req;
    req.id = 5;
    req.what = peer::kind::event;
    req.device = "tv-1";
    req.data = R"({"t":"event","kind":"device_online","device":"phone-1",)"
               R"("meta":{"name":"Phone \u00e9"}})";
    req.conn = 18'446'744'073'709'551'615ull;
    peer::request got;
    REQUIRE(round_trip(req, got) == peer::frame_reader::result::request);
    CHECK(got.what == peer::kind::event);
    CHECK(static_cast<int>(got.what) == 4);
    CHECK(got.device == "tv-1");
    CHECK(got.data == req.data);
    CHECK(got.conn == req.conn);
}

TEST_CASE("a request of an unknown kind is an error") {
    // The encoder writes whatever kind it is given; kinds 0 and 5 are not
    // part of the protocol and end the link on the receiving side.
    for (int k : {0, 5}) {
        peer::request req;
        req.what = static_cast<peer::kind>(k);
        peer::request got;
        CHECK(round_trip(req, got) == peer::frame_reader::result::error);
    }
}

TEST_CASE("registry records keep the account intact, tabs included") {
    registry::record r;
    r.node = "node-1";
    r.peer = "127.0.0.1:4000";
    r.conn = 12;
    r.connected_at = 1700000000;
    r.account = "acc\twith tab";
    auto text = registry::format_record(r);
    CHECK(text.starts_with(registry::owner_prefix("node-1", "127.0.0.1:4000", 12)));
    auto back = registry::parse_record(text);
    REQUIRE(back);
    CHECK(back->node == "node-1");
    CHECK(back->peer == "127.0.0.1:4000");
    CHECK(back->conn == 12);
    CHECK(back->connected_at == 1700000000);
    CHECK(back->account == "acc\twith tab");
    CHECK_FALSE(registry::parse_record("garbage"));
    CHECK_FALSE(registry::parse_record("n\tp\tnot-a-number\t1\ta"));
}

TEST_CASE("redis URLs parse, and bad ones say what is wrong") {
    auto u = redis::parse_url("redis://:s%40cret@10.0.0.5:6380/2");
    CHECK(u.host == "10.0.0.5");
    CHECK(u.port == 6380);
    CHECK(u.password == "s@cret");
    CHECK(u.db == 2);
    CHECK(u.display() == "redis://:***@10.0.0.5:6380/2");
    auto plain = redis::parse_url("redis://localhost");
    CHECK(plain.host == "localhost");
    CHECK(plain.port == 6379);
    CHECK_THROWS_AS(redis::parse_url("http://localhost"), config_error);
    CHECK_THROWS_AS(redis::parse_url("redis://host:99999"), config_error);
    CHECK_THROWS_AS(redis::parse_url("redis://host/x"), config_error);
    CHECK_THROWS_AS(redis::parse_url("redis://"), config_error);
}

TEST_CASE("script digests are the SHA1 Redis computes") {
    // SHA1("return 1"), as SCRIPT LOAD reports it.
    CHECK(redis::script_sha1("return 1") ==
          "e0e1f9fabfc9d4800c877a703b823ac0578ff8db");
}
