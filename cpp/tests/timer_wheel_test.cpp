// Unit tests of the per-thread timer wheel.
#include <doctest/doctest.h>

#include <vector>

#include "core/timer_wheel.hpp"

using namespace std::chrono_literals;
using pushy::timer_entry;
using pushy::timer_wheel;

namespace {

struct probe : timer_entry {
    std::vector<int>* log = nullptr;
    int tag = 0;
    static void on_fire(timer_entry* e) {
        auto* p = static_cast<probe*>(e);
        p->log->push_back(p->tag);
    }
};

}  // namespace

TEST_CASE("entries fire once their deadline has passed, never early") {
    timer_wheel w(10ms, 64);
    std::vector<int> log;
    probe a, b;
    a.log = b.log = &log;
    a.tag = 1;
    b.tag = 2;
    a.fire = b.fire = &probe::on_fire;
    auto t0 = timer_wheel::clock::now();
    w.schedule(a, t0 + 30ms);
    w.schedule(b, t0 + 100ms);
    CHECK(w.advance(t0 + 20ms) == 0);
    CHECK(w.advance(t0 + 45ms) == 1);
    CHECK(log == std::vector<int>{1});
    CHECK_FALSE(a.scheduled());
    CHECK(b.scheduled());
    CHECK(w.advance(t0 + 200ms) == 1);
    CHECK(log == std::vector<int>{1, 2});
}

TEST_CASE("deadlines beyond one turn of the wheel wait for their turn") {
    timer_wheel w(10ms, 8);  // one turn = 80 ms
    std::vector<int> log;
    probe a;
    a.log = &log;
    a.fire = &probe::on_fire;
    auto t0 = timer_wheel::clock::now();
    w.schedule(a, t0 + 250ms);
    for (int ms = 0; ms < 240; ms += 10) {
        w.advance(t0 + std::chrono::milliseconds(ms));
    }
    CHECK(log.empty());
    w.advance(t0 + 270ms);
    CHECK(log.size() == 1);
}

TEST_CASE("cancel and reschedule") {
    timer_wheel w(10ms, 16);
    std::vector<int> log;
    probe a;
    a.log = &log;
    a.fire = &probe::on_fire;
    auto t0 = timer_wheel::clock::now();
    w.schedule(a, t0 + 20ms);
    timer_wheel::cancel(a);
    CHECK_FALSE(a.scheduled());
    w.advance(t0 + 100ms);
    CHECK(log.empty());
    w.schedule(a, t0 + 150ms);
    w.schedule(a, t0 + 300ms);  // moves, does not duplicate
    w.advance(t0 + 200ms);
    CHECK(log.empty());
    w.advance(t0 + 310ms);
    CHECK(log.size() == 1);
}

namespace {

struct rearm : timer_entry {
    timer_wheel* wheel = nullptr;
    int fired = 0;
    static void on_fire(timer_entry* e) {
        auto* r = static_cast<rearm*>(e);
        ++r->fired;
        // Scheduling "now" from a callback lands in a future slot.
        r->wheel->schedule(*r, timer_wheel::clock::now());
    }
};

}  // namespace

TEST_CASE("a callback that schedules again does not fire twice in one advance") {
    timer_wheel w(10ms, 16);
    rearm r;
    r.wheel = &w;
    r.fire = &rearm::on_fire;
    auto t0 = timer_wheel::clock::now();
    w.schedule(r, t0);
    w.advance(t0 + 50ms);
    CHECK(r.fired == 1);
    CHECK(r.scheduled());
}

TEST_CASE("a long stall fires everything due, visiting each slot once") {
    timer_wheel w(10ms, 8);
    std::vector<int> log;
    std::vector<probe> ps(20);
    auto t0 = timer_wheel::clock::now();
    for (int i = 0; i < 20; ++i) {
        ps[i].log = &log;
        ps[i].tag = i;
        ps[i].fire = &probe::on_fire;
        w.schedule(ps[i], t0 + std::chrono::milliseconds(10 * i));
    }
    CHECK(w.advance(t0 + 10s) == 20);
    CHECK(log.size() == 20);
}
