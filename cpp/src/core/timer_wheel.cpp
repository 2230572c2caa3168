#include "core/timer_wheel.hpp"

#include <algorithm>

namespace pushy {

// Makes an empty wheel whose tick 0 is now; every slot is a self-linked
// sentinel.
timer_wheel::timer_wheel(std::chrono::milliseconds tick, std::size_t slots)
    : tick_(tick), origin_(clock::now()), slots_(slots) {
    for (auto& s : slots_) s.prev = s.next = &s;
}

// Unlinks whatever is still scheduled so entries do not point at freed
// sentinels.
timer_wheel::~timer_wheel() {
    for (auto& s : slots_) {
        while (s.next != &s) cancel(*s.next);
    }
}

// Converts a time point to a tick. Deadlines round up so an entry never
// fires early; the present rounds down.
std::uint64_t timer_wheel::to_tick(clock::time_point t,
                                   bool up) const noexcept {
    if (t <= origin_) return 0;
    auto d = std::chrono::duration_cast<std::chrono::nanoseconds>(t - origin_);
    auto n = std::chrono::duration_cast<std::chrono::nanoseconds>(tick_);
    auto extra = up ? n.count() - 1 : 0;
    return static_cast<std::uint64_t>((d.count() + extra) / n.count());
}

// Links `e` into the slot of its deadline. A deadline already in the past
// goes into the current slot and fires on the next advance().
void timer_wheel::schedule(timer_entry& e, clock::time_point when) noexcept {
    cancel(e);
    std::uint64_t due = std::max(to_tick(when, true), current_);
    e.due = due;
    timer_entry& head = slots_[due % slots_.size()];
    e.prev = head.prev;
    e.next = &head;
    head.prev->next = &e;
    head.prev = &e;
}

// Unlinks `e` from whatever list holds it.
void timer_wheel::cancel(timer_entry& e) noexcept {
    if (!e.scheduled()) return;
    e.prev->next = e.next;
    e.next->prev = e.prev;
    e.prev = e.next = nullptr;
}

// Collects every due entry from the slots between the last processed tick
// and `now`, moves the wheel past `now`, then fires them. Firing last means
// a callback that schedules again always lands in a future slot. Entries
// whose deadline lies a full turn or more ahead stay where they are.
std::size_t timer_wheel::advance(clock::time_point now) {
    std::uint64_t target = to_tick(now, false);
    if (target < current_) return 0;
    timer_entry due_list;
    due_list.prev = due_list.next = &due_list;
    std::uint64_t turns =
        std::min<std::uint64_t>(target - current_ + 1, slots_.size());
    for (std::uint64_t i = 0; i < turns; ++i) {
        timer_entry& head = slots_[(current_ + i) % slots_.size()];
        for (timer_entry* e = head.next; e != &head;) {
            timer_entry* next = e->next;
            if (e->due <= target) {
                cancel(*e);
                e->prev = due_list.prev;
                e->next = &due_list;
                due_list.prev->next = e;
                due_list.prev = e;
            }
            e = next;
        }
    }
    current_ = target + 1;
    std::size_t fired = 0;
    while (due_list.next != &due_list) {
        timer_entry* e = due_list.next;
        cancel(*e);
        ++fired;
        e->fire(e);
    }
    return fired;
}

}  // namespace pushy
