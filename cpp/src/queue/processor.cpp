#include "pushy/processor.hpp"

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>

#include <hiredis/hiredis.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <future>
#include <limits>
#include <queue>
#include <random>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "core/logging.hpp"
#include "pushy/config.hpp"
#include "queue/queue.hpp"
#include "registry/redis_client.hpp"
#include "registry/registry.hpp"
#include "routing/router.hpp"

namespace pushy {

namespace net = boost::asio;
using boost::system::error_code;
using clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

milliseconds ms_of(double seconds) {
    return milliseconds(static_cast<long long>(std::llround(seconds * 1000)));
}

std::string default_consumer() {
    char host[256] = {0};
    if (gethostname(host, sizeof host - 1) != 0) host[0] = '\0';
    return std::string(host[0] ? host : "processor") + "-" +
           std::to_string(getpid());
}

void bump(std::atomic<std::uint64_t>& a, std::uint64_t n = 1) {
    a.fetch_add(n, std::memory_order_relaxed);
}

// Outcomes that another attempt cannot change: the message itself is bad.
bool permanent(int code) { return code == 400 || code == 403 || code == 413; }

bool fits(double v, double lo, double hi) { return v >= lo && v <= hi; }

}  // namespace

void processor_config::validate() const {
    if (redis.empty()) throw config_error("redis must be a Redis URL");
    redis::parse_url(redis);
    if (prefix.empty() ||
        prefix.find_first_of(" \t\r\n{}") != std::string::npos) {
        throw config_error("prefix must be non-empty, without blanks or "
                           "braces");
    }
    if (group.empty() || group.size() > 200) {
        throw config_error("group must be 1 to 200 characters");
    }
    if (consumer.size() > 200) {
        throw config_error("consumer must be at most 200 characters");
    }
    if (shards < 1 || shards > 1024) {
        throw config_error("shards must be between 1 and 1024");
    }
    if (batch < 1 || batch > 10000) {
        throw config_error("batch must be between 1 and 10000");
    }
    if (max_in_flight < batch || max_in_flight > 10000000) {
        throw config_error("max_in_flight must be at least batch and at "
                           "most 10000000");
    }
    if (max_waiting < 1 || max_waiting > 100000000) {
        throw config_error("max_waiting must be between 1 and 100000000");
    }
    if (dead_maxlen < 1) {
        throw config_error("dead_maxlen must be at least 1");
    }
    auto blank = [](const std::string& v) {
        return v.find_first_of(" \t\r\n") != std::string::npos;
    };
    if (blank(group) || blank(consumer)) {
        throw config_error("group and consumer must not contain blanks");
    }
    if (!fits(claim_idle_s, 0.2, 86400)) {
        throw config_error("claim_idle_s must be between 0.2 and 86400");
    }
    if (!fits(retry_min_s, 0.001, 3600) || !fits(retry_max_s, retry_min_s,
                                                  3600)) {
        throw config_error("retry_min_s must be between 0.001 and 3600, and "
                           "retry_max_s between retry_min_s and 3600");
    }
    if (!fits(push_timeout_s, 0.01, 3600)) {
        throw config_error("push_timeout_s must be between 0.01 and 3600");
    }
    if (!fits(ack_timeout_s, 0.01, 3600)) {
        throw config_error("ack_timeout_s must be between 0.01 and 3600");
    }
    if (!fits(route_cache_ttl_s, 0, 3600)) {
        throw config_error("route_cache_ttl_s must be between 0 and 3600");
    }
}

class processor_impl {
public:
    explicit processor_impl(processor_config cfg)
        : cfg_(std::move(cfg)),
          url_(redis::parse_url(cfg_.redis)),
          reader_(ioc_, url_, "processor reads"),
          writer_(ioc_, url_, "processor"),
          store_(writer_, cfg_.prefix),
          router_(ioc_, store_, {}, ms_of(cfg_.route_cache_ttl_s)),
          read_retry_(ioc_), retry_timer_(ioc_), claim_timer_(ioc_),
          keep_timer_(ioc_) {
        if (cfg_.consumer.empty()) cfg_.consumer = default_consumer();
        for (unsigned i = 0; i < cfg_.shards; ++i) {
            shards_.push_back(queue::shard_key(cfg_.prefix, i));
        }
        dead_ = queue::dead_key(cfg_.prefix);
    }

    ~processor_impl() { stop(); }

    void start() {
        if (running_.exchange(true)) return;
        writer_.on_up([this] {
            redis_up_ = true;
            create_groups();
        });
        writer_.on_down([this] { redis_up_ = false; });
        net::post(ioc_, [this] {
            reader_.start();
            writer_.start();
            schedule_claim();
            schedule_keepalive();
        });
        thread_ = std::thread([this] { ioc_.run(); });
        PUSHY_INFO("processor {} reading {} shard{} of {}q: as group {}",
                   cfg_.consumer, cfg_.shards, cfg_.shards == 1 ? "" : "s",
                   cfg_.prefix, cfg_.group);
    }

    void stop() {
        if (!running_.exchange(false)) return;
        std::promise<void> stopped;
        net::post(ioc_, [this, &stopped] {
            stopped_ = true;
            read_retry_.cancel();
            retry_timer_.cancel();
            claim_timer_.cancel();
            keep_timer_.cancel();
            router_.stop();
            reader_.stop();
            writer_.stop();
            stopped.set_value();
        });
        stopped.get_future().wait();
        work_.reset();
        ioc_.stop();
        if (thread_.joinable()) thread_.join();
        PUSHY_INFO("processor {} stopped ({} held messages left pending)",
                   cfg_.consumer, held_.size());
    }

    bool running() const noexcept { return running_; }
    const std::string& consumer() const noexcept { return cfg_.consumer; }

    processor_stats stats() const {
        processor_stats s;
        s.read = read_.load();
        s.claimed = claimed_.load();
        s.attempts = attempts_.load();
        s.delivered = delivered_.load();
        s.retried = retried_.load();
        s.expired = expired_.load();
        s.undeliverable = undeliverable_.load();
        s.malformed = malformed_.load();
        s.redis_errors = redis_errors_.load();
        s.in_flight = held_count_.load();
        s.waiting = waiting_count_.load();
        s.redis_up = redis_up_.load();
        return s;
    }

private:
    // A message this consumer holds: being delivered, or waiting for its
    // next attempt. Its entry stays pending in the stream meanwhile.
    struct held {
        std::string stream;
        std::string entry_id;
        queue::message msg;
        unsigned attempts = 0;
        std::string last;  // the last failed attempt's code and reason
    };

    static std::string key_of(const std::string& stream,
                              const std::string& id) {
        return stream + ' ' + id;
    }

    // ------------------------------------------------------------ groups

    // Creates the group on every shard (and the shard itself) where it is
    // missing, then starts reading: this consumer's own pending entries
    // first (a restart resumes them), then new ones.
    void create_groups() {
        auto left = std::make_shared<unsigned>(cfg_.shards);
        for (auto& s : shards_) {
            writer_.command({"XGROUP", "CREATE", s, cfg_.group, "0",
                             "MKSTREAM"},
                            [this, left](redisReply* r) {
                                if (!r) bump(redis_errors_);
                                if (--*left == 0) begin_reading();
                            });
        }
    }

    void begin_reading() {
        if (stopped_ || reading_) return;
        history_ = true;
        cursors_.assign(cfg_.shards, "0");
        read_next();
    }

    // ----------------------------------------------------------- reading

    void read_next() {
        if (stopped_ || reading_) return;
        if (!room()) {
            paused_ = true;  // resumed when messages leave
            return;
        }
        paused_ = false;
        reading_ = true;
        auto count = std::to_string(cfg_.batch);
        std::vector<std::string_view> argv{"XREADGROUP", "GROUP", cfg_.group,
                                           cfg_.consumer, "COUNT", count};
        if (!history_) {
            argv.push_back("BLOCK");
            argv.push_back("500");
        }
        argv.push_back("STREAMS");
        for (auto& s : shards_) argv.push_back(s);
        for (unsigned i = 0; i < cfg_.shards; ++i) {
            argv.push_back(history_ ? std::string_view(cursors_[i]) : ">");
        }
        reader_.command(argv, [this](redisReply* r) { on_read(r); });
    }

    void on_read(redisReply* r) {
        reading_ = false;
        if (stopped_) return;
        std::vector<queue::entry> got;
        if (!r || redis::reply_is_error(r) ||
            !queue::parse_read_reply(r, got)) {
            if (r && redis::reply_is_error(r)) {
                // NOGROUP: Redis lost the group (it restarted empty).
                PUSHY_WARN("processor {}: read failed: {}", cfg_.consumer,
                           redis::reply_text(r));
                if (redis::reply_text(r).starts_with("NOGROUP")) {
                    create_groups_later();
                    return;
                }
            }
            bump(redis_errors_);
            return read_later();
        }
        read_backoff_ = milliseconds(100);
        if (history_) {
            if (got.empty()) {
                history_ = false;
            } else {
                for (auto& e : got) {
                    auto i = std::find(shards_.begin(), shards_.end(),
                                       e.stream) -
                             shards_.begin();
                    if (i < static_cast<long>(cursors_.size())) {
                        cursors_[i] = e.entry_id;
                    }
                }
            }
        }
        bump(read_, got.size());
        for (auto& e : got) take(std::move(e));
        read_next();
    }

    void read_later() {
        read_retry_.expires_after(read_backoff_);
        read_backoff_ = std::min(read_backoff_ * 2, milliseconds(2000));
        read_retry_.async_wait([this](error_code ec) {
            if (!ec) read_next();
        });
    }

    void create_groups_later() {
        read_retry_.expires_after(milliseconds(100));
        read_retry_.async_wait([this](error_code ec) {
            if (!ec) create_groups();
        });
    }

    // Whether a batch more fits: delivering and waiting messages each
    // below their bound.
    bool room() const {
        auto waiting = held_.size() - delivering_;
        return delivering_ + cfg_.batch <= cfg_.max_in_flight &&
               waiting < cfg_.max_waiting;
    }

    // Starts on an entry read or claimed. One already held (a claim of an
    // entry of ours) is left to its attempt in progress.
    void take(queue::entry e) {
        auto key = key_of(e.stream, e.entry_id);
        if (held_.count(key)) return;
        if (!e.msg) {
            if (e.error.empty()) {
                // Deleted while pending: nothing to deliver.
                return acknowledge(e.stream, e.entry_id);
            }
            bump(malformed_);
            PUSHY_WARN("processor {}: entry {} of {} is not a message ({}); "
                       "moved to {}",
                       cfg_.consumer, e.entry_id, e.stream, e.error, dead_);
            std::vector<std::string> f;
            for (auto& [k, v] : e.raw) {
                if (k == "reason" || k == "attempts") continue;
                f.push_back(k);
                f.push_back(v);
            }
            return bury(e.stream, e.entry_id, std::move(f),
                        "malformed: " + e.error, 0, {});
        }
        held h{e.stream, e.entry_id, std::move(*e.msg), 0, {}};
        auto [it, _] = held_.emplace(std::move(key), std::move(h));
        held_count_ = held_.size();
        attempt(it->first);
    }

    // --------------------------------------------------------- delivery

    void attempt(const std::string& key) {
        auto it = held_.find(key);
        if (it == held_.end()) return;
        auto& h = it->second;
        auto now_ms = peer::wall_ms();
        if (now_ms >= h.msg.expires_ms) {
            bump(expired_);
            std::string why = "expired";
            if (h.attempts) {
                why += " after " + std::to_string(h.attempts) +
                       " attempt" + (h.attempts == 1 ? "" : "s") +
                       " (last: " + h.last + ")";
            }
            return dead_letter(key, why);
        }
        ++h.attempts;
        ++delivering_;
        bump(attempts_);
        peer::request req;
        req.device = h.msg.device;
        req.data = h.msg.data;
        req.want_ack = h.msg.want_ack;
        req.from = h.msg.from;
        req.msg_id = h.msg.id;
        auto ack_wait = ms_of(cfg_.ack_timeout_s);
        // The node never delivers after the message expires.
        auto left = milliseconds(h.msg.expires_ms - now_ms);
        ack_wait = std::max(milliseconds(1), std::min(ack_wait, left));
        req.timeout_ms = static_cast<std::uint32_t>(ack_wait.count());
        router_.push(std::move(req), ms_of(cfg_.push_timeout_s) + ack_wait,
                     [this, key](const peer::reply& r) { on_result(key, r); });
    }

    void on_result(const std::string& key, const peer::reply& r) {
        if (stopped_) return;
        --delivering_;
        if (paused_) read_next();
        auto it = held_.find(key);
        if (it == held_.end()) return;  // claimed by another consumer
        auto& h = it->second;
        if (r.code == 200) {
            bump(delivered_);
            acknowledge(h.stream, h.entry_id);
            return release(it);
        }
        h.last = std::to_string(r.code) + " " +
                 (r.reason.empty() ? r.status : r.reason);
        if (permanent(r.code)) {
            bump(undeliverable_);
            PUSHY_WARN("processor {}: message {} for {} is undeliverable "
                       "({}); moved to {}",
                       cfg_.consumer, h.msg.id, h.msg.device, h.last, dead_);
            return dead_letter(key, "undeliverable: " + h.last);
        }
        bump(retried_);
        auto wait = backoff(h.attempts);
        PUSHY_DEBUG("processor {}: message {} for {}: attempt {} failed ({}); "
                    "next in {} ms",
                    cfg_.consumer, h.msg.id, h.msg.device, h.attempts, h.last,
                    wait.count());
        schedule_retry(key, wait, h.msg.expires_ms);
    }

    // The wait before attempt `n + 1`: retry_min_s doubled per attempt, at
    // most retry_max_s, less up to 20% so retries of a burst spread out.
    milliseconds backoff(unsigned n) const {
        thread_local std::minstd_rand rng{std::random_device{}()};
        double s = cfg_.retry_min_s * std::pow(2.0, std::min(n, 30u) - 1.0);
        s = std::min(s, cfg_.retry_max_s);
        std::uniform_real_distribution<double> d(0.8, 1.0);
        return ms_of(s * d(rng));
    }

    // Runs attempt(key) after `delay`, or at the message's expiry if that
    // comes first (which then dead-letters it).
    void schedule_retry(const std::string& key, milliseconds delay,
                        std::uint64_t expires_ms) {
        auto now_ms = peer::wall_ms();
        auto to_expiry = milliseconds(
            expires_ms > now_ms ? expires_ms - now_ms : 0);
        auto due = clock::now() + std::min(delay, to_expiry);
        retries_.push({due, key});
        waiting_count_ = retries_.size();
        arm_retry_timer();
    }

    void arm_retry_timer() {
        if (retries_.empty() || stopped_) return;
        auto due = retries_.top().due;
        if (retry_armed_ && retry_due_ <= due) return;
        retry_armed_ = true;
        retry_due_ = due;
        retry_timer_.expires_at(due);
        retry_timer_.async_wait([this](error_code ec) {
            if (ec) return;
            retry_armed_ = false;
            auto now = clock::now();
            while (!retries_.empty() && retries_.top().due <= now) {
                auto key = retries_.top().key;
                retries_.pop();
                attempt(key);
            }
            waiting_count_ = retries_.size();
            arm_retry_timer();
        });
    }

    // XACK then XDEL: the queue keeps only undelivered messages.
    void acknowledge(const std::string& stream, const std::string& id) {
        ++acking_;
        writer_.command({"XACK", stream, cfg_.group, id},
                        [this](redisReply* r) {
                            --acking_;
                            // Unacknowledged, the entry stays pending: it
                            // is claimed and delivered again (a duplicate).
                            if (!r || redis::reply_is_error(r)) {
                                bump(redis_errors_);
                            }
                        });
        writer_.command({"XDEL", stream, id}, [](redisReply*) {});
    }

    void dead_letter(const std::string& key, std::string reason) {
        auto it = held_.find(key);
        if (it == held_.end()) return;
        auto& h = it->second;
        bury(h.stream, h.entry_id, queue::fields_of(h.msg), std::move(reason),
             h.attempts, key);
    }

    // Appends a dead letter and, once Redis has it, acknowledges the
    // entry. Without an answer the entry stays: held ones try again later,
    // others stay pending to be claimed. Nothing is dropped unrecorded.
    void bury(const std::string& stream, const std::string& entry_id,
              std::vector<std::string> fields, std::string reason,
              unsigned attempts, const std::string& key) {
        auto maxlen = std::to_string(cfg_.dead_maxlen);
        std::vector<std::string_view> argv{"XADD", dead_, "MAXLEN", "~",
                                           maxlen, "*"};
        fields.push_back("reason");
        fields.push_back(std::move(reason));
        fields.push_back("attempts");
        fields.push_back(std::to_string(attempts));
        fields.push_back("stream");
        fields.push_back(stream);
        fields.push_back("entry");
        fields.push_back(entry_id);
        for (auto& f : fields) argv.push_back(f);
        writer_.command(argv, [this, stream, entry_id, key](redisReply* r) {
            if (stopped_) return;
            if (!r || redis::reply_is_error(r)) {
                bump(redis_errors_);
                if (!key.empty()) {
                    schedule_retry(key, milliseconds(1000),
                                   std::numeric_limits<std::uint64_t>::max());
                }
                return;
            }
            acknowledge(stream, entry_id);
            if (auto it = held_.find(key); !key.empty() && it != held_.end()) {
                release(it);
            }
        });
    }

    void release(std::unordered_map<std::string, held>::iterator it) {
        held_.erase(it);
        held_count_ = held_.size();
        if (paused_) read_next();
    }

    // ---------------------------------------------------------- claiming

    // Every half claim interval: take over the entries that other
    // consumers have held longer than claim_idle_s (they are dead or
    // stalled), shard by shard.
    void schedule_claim() {
        claim_timer_.expires_after(
            std::max(milliseconds(50), ms_of(cfg_.claim_idle_s / 2)));
        claim_timer_.async_wait([this](error_code ec) {
            if (ec) return;
            claim(0, "0-0");
        });
    }

    void claim(unsigned shard, std::string cursor) {
        if (stopped_) return;
        if (shard >= cfg_.shards || !writer_.up() || history_) {
            return schedule_claim();
        }
        if (!room()) return schedule_claim();
        auto idle = std::to_string(ms_of(cfg_.claim_idle_s).count());
        auto count = std::to_string(cfg_.batch);
        writer_.command(
            {"XAUTOCLAIM", shards_[shard], cfg_.group, cfg_.consumer, idle,
             cursor, "COUNT", count},
            [this, shard](redisReply* r) {
                if (stopped_) return;
                std::vector<queue::entry> got;
                std::string next;
                if (!r || redis::reply_is_error(r) ||
                    !queue::parse_claim_reply(r, shards_[shard], next, got)) {
                    if (!r) bump(redis_errors_);
                    return claim(shard + 1, "0-0");
                }
                if (!got.empty()) {
                    PUSHY_INFO("processor {}: claimed {} pending entr{} of "
                               "{}",
                               cfg_.consumer, got.size(),
                               got.size() == 1 ? "y" : "ies", shards_[shard]);
                }
                bump(claimed_, got.size());
                for (auto& e : got) take(std::move(e));
                if (next.empty() || next == "0-0") {
                    return claim(shard + 1, "0-0");
                }
                claim(shard, next);
            });
    }

    // Every quarter claim interval: this consumer's pending list shows
    // which held entries another consumer claimed (they are dropped here:
    // it delivers them), and XCLAIM to ourselves resets the idle time of
    // the rest, so that no one claims a message we are still retrying.
    void schedule_keepalive() {
        keep_timer_.expires_after(
            std::max(milliseconds(50), ms_of(cfg_.claim_idle_s / 4)));
        keep_timer_.async_wait([this](error_code ec) {
            if (ec) return;
            keepalive(0);
        });
    }

    void keepalive(unsigned shard) {
        if (stopped_) return;
        if (shard >= cfg_.shards) return schedule_keepalive();
        const auto& stream = shards_[shard];
        std::vector<std::string> ids;
        for (auto& [k, h] : held_) {
            if (h.stream == stream) ids.push_back(h.entry_id);
        }
        if (ids.empty() || !writer_.up()) return keepalive(shard + 1);
        // Our pending list also holds entries whose XACK is on its way; a
        // reply cut at `count` cannot tell a held entry is gone.
        auto limit = ids.size() + acking_ + 16;
        auto count = std::to_string(limit);
        writer_.command(
            {"XPENDING", stream, cfg_.group, "-", "+", count, cfg_.consumer},
            [this, shard, limit, ids = std::move(ids)](redisReply* r) mutable {
                if (stopped_) return;
                if (!r || r->type != REDIS_REPLY_ARRAY) {
                    bump(redis_errors_);
                    return keepalive(shard + 1);
                }
                std::unordered_set<std::string_view> mine;
                for (std::size_t i = 0; i < r->elements; ++i) {
                    auto* e = r->element[i];
                    if (e->type == REDIS_REPLY_ARRAY && e->elements > 0) {
                        mine.insert(redis::reply_text(e->element[0]));
                    }
                }
                bool whole = r->elements < limit;
                const auto& stream = shards_[shard];
                std::vector<std::string> keep;
                for (auto& id : ids) {
                    if (!whole || mine.count(id)) {
                        keep.push_back(std::move(id));
                    } else {
                        check_owner(stream, id);
                    }
                }
                touch(stream, std::move(keep));
                keepalive(shard + 1);
            });
    }

    // A held entry missing from our pending list: another consumer claimed
    // it (it delivers it now: let it go), or it is pending nowhere (Redis
    // restarted empty, or the entry was deleted): then only this
    // processor still has the message, and goes on delivering it.
    void check_owner(const std::string& stream, const std::string& id) {
        writer_.command(
            {"XPENDING", stream, cfg_.group, id, id, "1"},
            [this, key = key_of(stream, id), id, stream](redisReply* r) {
                if (stopped_ || !r || r->type != REDIS_REPLY_ARRAY ||
                    r->elements == 0) {
                    return;
                }
                auto* e = r->element[0];
                if (e->type != REDIS_REPLY_ARRAY || e->elements < 2 ||
                    redis::reply_text(e->element[1]) == cfg_.consumer) {
                    return;
                }
                if (auto it = held_.find(key); it != held_.end()) {
                    PUSHY_INFO("processor {}: entry {} of {} was claimed by "
                               "{}",
                               cfg_.consumer, id, stream,
                               redis::reply_text(e->element[1]));
                    release(it);
                }
            });
    }

    void touch(const std::string& stream, std::vector<std::string> ids) {
        for (std::size_t at = 0; at < ids.size(); at += 1000) {
            std::vector<std::string_view> argv{"XCLAIM", stream, cfg_.group,
                                               cfg_.consumer, "0"};
            auto end = std::min(ids.size(), at + 1000);
            for (auto i = at; i < end; ++i) argv.push_back(ids[i]);
            argv.push_back("JUSTID");
            writer_.command(argv, [this](redisReply* r) {
                if (!r) bump(redis_errors_);
            });
        }
    }

    struct due_entry {
        clock::time_point due;
        std::string key;
        bool operator>(const due_entry& o) const { return due > o.due; }
    };

    processor_config cfg_;
    redis::url url_;
    net::io_context ioc_{1};
    net::executor_work_guard<net::io_context::executor_type> work_ =
        net::make_work_guard(ioc_);
    redis::client reader_;  // XREADGROUP ... BLOCK holds its link
    redis::client writer_;  // everything else
    registry::store store_;
    routing::router router_;
    std::vector<std::string> shards_;
    std::string dead_;
    std::thread thread_;
    std::atomic<bool> running_{false};

    // io thread only
    bool stopped_ = false;
    bool reading_ = false;
    bool paused_ = false;
    bool history_ = true;
    std::vector<std::string> cursors_;
    milliseconds read_backoff_{100};
    net::steady_timer read_retry_;
    net::steady_timer retry_timer_;
    net::steady_timer claim_timer_;
    net::steady_timer keep_timer_;
    bool retry_armed_ = false;
    std::size_t acking_ = 0;  // XACKs sent and not answered
    std::size_t delivering_ = 0;  // attempts waiting for their answer
    clock::time_point retry_due_;
    std::unordered_map<std::string, held> held_;
    std::priority_queue<due_entry, std::vector<due_entry>,
                        std::greater<due_entry>>
        retries_;

    std::atomic<std::uint64_t> read_{0}, claimed_{0}, attempts_{0},
        delivered_{0}, retried_{0}, expired_{0}, undeliverable_{0},
        malformed_{0}, redis_errors_{0}, held_count_{0}, waiting_count_{0};
    std::atomic<bool> redis_up_{false};
};

message_processor::message_processor(processor_config cfg) {
    cfg.validate();
    auto u = redis::parse_url(cfg.redis);
    std::string why;
    if (!redis::probe(u, milliseconds(2000), why)) {
        PUSHY_WARN("processor: redis at {} is not reachable ({}); retrying "
                   "until it is",
                   u.display(), why);
    }
    impl_ = std::make_unique<processor_impl>(std::move(cfg));
}

message_processor::~message_processor() = default;
void message_processor::start() { impl_->start(); }
void message_processor::stop() { impl_->stop(); }
bool message_processor::running() const noexcept { return impl_->running(); }
const std::string& message_processor::consumer() const noexcept {
    return impl_->consumer();
}
processor_stats message_processor::stats() const { return impl_->stats(); }

}  // namespace pushy
