// An asynchronous Redis connection (hiredis) driven by an Asio io_context.
//
// Threading: every member runs on the io_context's thread, except
// parse_url() and probe(), which may run anywhere. Replies arrive on that
// thread. Nothing here blocks the event loop.
#pragma once

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

struct redisAsyncContext;
struct redisReply;

namespace pushy::redis {

// Where a Redis server is: redis://[[user]:password@]host[:port][/db].
struct url {
    std::string host = "127.0.0.1";
    std::uint16_t port = 6379;
    std::string user;
    std::string password;
    int db = 0;

    // The URL without the password, for logs and errors.
    std::string display() const;
};

// Parses a Redis URL. Throws config_error saying what is wrong.
url parse_url(std::string_view text);

// Connects once, blocking up to `timeout`, and checks the credentials and
// database. Returns true when the server answered PING; false when it could
// not be reached (`why` says how). Throws config_error when it refused our
// credentials or database: retrying would not help.
bool probe(const url& u, std::chrono::milliseconds timeout, std::string& why);

// A reply, or null when there is none: no connection, the connection broke
// before the answer, or the server took longer than the command timeout.
using reply_fn = std::function<void(redisReply*)>;

class client {
public:
    // `name` appears in log lines ("registry", "push client").
    client(boost::asio::io_context& ioc, url u, std::string name);
    ~client();
    client(const client&) = delete;
    client& operator=(const client&) = delete;

    // Connects, and reconnects with backoff whenever the link drops.
    void start();
    // Drops the link; pending commands get a null reply. Idempotent.
    void stop();

    // True when connected and authenticated.
    bool up() const noexcept { return up_.load(std::memory_order_relaxed); }

    // Called on every (re)connection, once AUTH/SELECT succeeded.
    void on_up(std::function<void()> fn) { on_up_ = std::move(fn); }
    // Called when a live link is lost.
    void on_down(std::function<void()> fn) { on_down_ = std::move(fn); }

    // Sends one command; `done` runs exactly once. Without a link it runs
    // at once (posted) with a null reply.
    void command(const std::vector<std::string_view>& argv, reply_fn done);

    // Runs a Lua script by its SHA1 (EVALSHA), loading it (EVAL) when the
    // server does not know it yet. `keys` then `args` as in EVAL.
    void eval(const std::string& script, const std::string& sha1,
              const std::vector<std::string_view>& keys,
              const std::vector<std::string_view>& args, reply_fn done);

    // Commands sent and not answered yet.
    std::size_t in_flight() const noexcept { return sent_.size(); }

    // How long a command may wait for its answer before the link is
    // dropped (and every pending command answered null).
    std::chrono::milliseconds command_timeout{2000};

    struct watcher;

private:
    void connect();
    void schedule_reconnect();
    void on_connected(int status);
    void on_disconnected(int status);
    void check_timeouts();
    void send(const std::vector<std::string_view>& argv, reply_fn done,
              bool internal);
    static void on_reply(redisAsyncContext* c, void* r, void* priv);

    boost::asio::io_context& ioc_;
    url url_;
    std::string name_;
    redisAsyncContext* ctx_ = nullptr;
    std::shared_ptr<watcher> watcher_;
    boost::asio::steady_timer retry_;
    boost::asio::steady_timer sweep_;
    std::chrono::milliseconds backoff_{100};
    std::atomic<bool> up_{false};
    bool stopped_ = true;
    bool logged_down_ = false;
    std::function<void()> on_up_;
    std::function<void()> on_down_;
    // Send times of the commands in flight, oldest first (Redis answers in
    // order, so the front is the one to time out first).
    std::deque<std::chrono::steady_clock::time_point> sent_;
    std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// SHA1 of a script, as EVALSHA wants it (40 lower-case hex digits).
std::string script_sha1(std::string_view script);

// Reply helpers: a reply's text (string, status or error), or empty.
std::string_view reply_text(const redisReply* r);
bool reply_is_error(const redisReply* r);
bool reply_is_nil(const redisReply* r);
long long reply_integer(const redisReply* r);

}  // namespace pushy::redis
