// A hashed timing wheel: one per io thread, shared by all its connections.
//
// A connection embeds one timer_entry instead of owning an Asio timer, so an
// idle connection costs 32 bytes of timer state and no kernel or reactor
// resources. The wheel advances on one steady timer per thread; deadlines
// have the resolution of a tick (10 ms by default).
//
// Thread safety: none. A wheel and its entries belong to one io thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <vector>

namespace pushy {

// An intrusive wheel entry. `fire` is called on the wheel's thread when the
// deadline passes; the entry is unlinked before the call, so `fire` may
// schedule it again.
struct timer_entry {
    using callback = void (*)(timer_entry*);

    timer_entry* prev = nullptr;
    timer_entry* next = nullptr;
    std::uint64_t due = 0;  // tick
    callback fire = nullptr;

    bool scheduled() const noexcept { return prev != nullptr; }
};

class timer_wheel {
public:
    using clock = std::chrono::steady_clock;

    explicit timer_wheel(std::chrono::milliseconds tick =
                             std::chrono::milliseconds(10),
                         std::size_t slots = 4096);
    ~timer_wheel();
    timer_wheel(const timer_wheel&) = delete;
    timer_wheel& operator=(const timer_wheel&) = delete;

    // Schedules `e` (unlinking it first if scheduled) to fire at `when`.
    void schedule(timer_entry& e, clock::time_point when) noexcept;

    // Unlinks `e` if it is scheduled; no-op otherwise.
    static void cancel(timer_entry& e) noexcept;

    // Fires every entry whose deadline is at or before `now`. Returns the
    // number fired.
    std::size_t advance(clock::time_point now);

    // Tick length.
    std::chrono::milliseconds tick() const noexcept { return tick_; }

private:
    // Tick of `t`, rounded up (deadlines) or down (the present).
    std::uint64_t to_tick(clock::time_point t, bool up) const noexcept;

    std::chrono::milliseconds tick_;
    clock::time_point origin_;
    std::uint64_t current_ = 0;  // next tick to process
    std::vector<timer_entry> slots_;  // list heads (sentinels)
};

}  // namespace pushy
