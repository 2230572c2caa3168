#include "registry/redis_client.hpp"

#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/post.hpp>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <openssl/sha.h>

#include <charconv>
#include <cstring>

#include "core/logging.hpp"
#include "detail/url.hpp"
#include "pushy/config.hpp"

namespace pushy::redis {

namespace net = boost::asio;
using boost::system::error_code;
using clock = std::chrono::steady_clock;

// ------------------------------------------------------------------- URLs

std::string url::display() const {
    std::string s = "redis://";
    if (!user.empty() || !password.empty()) s += user + ":***@";
    s += host + ":" + std::to_string(port);
    if (db) s += "/" + std::to_string(db);
    return s;
}

url parse_url(std::string_view text) {
    auto fail = [&](std::string_view what) {
        // The URL as written, less any password.
        std::string shown(text);
        if (auto at = shown.rfind('@'); at != std::string::npos) {
            auto start = shown.find("://");
            start = start == std::string::npos ? 0 : start + 3;
            if (at > start) shown.replace(start, at - start, "***");
        }
        throw config_error("redis URL '" + shown + "': " + std::string(what) +
                           " (expected redis://[:password@]host[:port][/db])");
    };
    constexpr std::string_view scheme = "redis://";
    if (!text.starts_with(scheme)) fail("it must start with redis://");
    std::string_view rest = text.substr(scheme.size());
    url u;
    if (auto at = rest.rfind('@'); at != std::string_view::npos) {
        std::string_view cred = rest.substr(0, at);
        rest = rest.substr(at + 1);
        auto colon = cred.find(':');
        if (colon == std::string_view::npos) {
            u.password = pushy::url::percent_decode(cred);
        } else {
            u.user = pushy::url::percent_decode(cred.substr(0, colon));
            u.password = pushy::url::percent_decode(cred.substr(colon + 1));
        }
    }
    std::string_view hostport = rest;
    if (auto slash = rest.find('/'); slash != std::string_view::npos) {
        hostport = rest.substr(0, slash);
        std::string_view db = rest.substr(slash + 1);
        if (!db.empty()) {
            auto r = std::from_chars(db.data(), db.data() + db.size(), u.db);
            if (r.ec != std::errc{} || r.ptr != db.data() + db.size() ||
                u.db < 0) {
                fail("the database must be a number");
            }
        }
    }
    std::string_view host = hostport;
    if (auto colon = hostport.rfind(':'); colon != std::string_view::npos) {
        host = hostport.substr(0, colon);
        std::string_view port = hostport.substr(colon + 1);
        unsigned p = 0;
        auto r = std::from_chars(port.data(), port.data() + port.size(), p);
        if (r.ec != std::errc{} || r.ptr != port.data() + port.size() ||
            p == 0 || p > 65535) {
            fail("the port must be a number from 1 to 65535");
        }
        u.port = static_cast<std::uint16_t>(p);
    }
    if (host.empty()) fail("the host is missing");
    u.host = std::string(host);
    return u;
}

namespace {

// Builds AUTH / SELECT argv for `u` (empty when none is needed).
std::vector<std::vector<std::string>> hello_commands(const url& u) {
    std::vector<std::vector<std::string>> out;
    if (!u.password.empty()) {
        if (u.user.empty()) {
            out.push_back({"AUTH", u.password});
        } else {
            out.push_back({"AUTH", u.user, u.password});
        }
    }
    if (u.db) out.push_back({"SELECT", std::to_string(u.db)});
    return out;
}

}  // namespace

bool probe(const url& u, std::chrono::milliseconds timeout, std::string& why) {
    timeval tv{};
    tv.tv_sec = timeout.count() / 1000;
    tv.tv_usec = (timeout.count() % 1000) * 1000;
    redisContext* c = redisConnectWithTimeout(u.host.c_str(), u.port, tv);
    if (!c || c->err) {
        why = c ? c->errstr : "out of memory";
        if (c) redisFree(c);
        return false;
    }
    redisSetTimeout(c, tv);
    auto run = [&](const std::vector<std::string>& cmd) -> std::string {
        std::vector<const char*> argv;
        std::vector<std::size_t> lens;
        for (auto& a : cmd) {
            argv.push_back(a.data());
            lens.push_back(a.size());
        }
        auto* r = static_cast<redisReply*>(redisCommandArgv(
            c, static_cast<int>(argv.size()), argv.data(), lens.data()));
        if (!r) return std::string("no answer: ") + c->errstr;
        std::string err;
        if (r->type == REDIS_REPLY_ERROR) err = std::string(r->str, r->len);
        freeReplyObject(r);
        return err.empty() ? std::string() : "refused: " + err;
    };
    for (auto& cmd : hello_commands(u)) {
        auto err = run(cmd);
        if (err.empty()) continue;
        redisFree(c);
        if (err.starts_with("no answer")) {
            why = err;
            return false;
        }
        throw config_error("redis at " + u.display() + " " + err + " (" +
                           cmd[0] + ")");
    }
    auto err = run({"PING"});
    redisFree(c);
    if (err.empty()) return true;
    if (err.find("NOAUTH") != std::string::npos) {
        throw config_error("redis at " + u.display() +
                           " needs a password: " + err);
    }
    why = err;
    return false;
}

std::string script_sha1(std::string_view script) {
    unsigned char md[SHA_DIGEST_LENGTH];
    SHA1(reinterpret_cast<const unsigned char*>(script.data()), script.size(),
         md);
    static constexpr char hex[] = "0123456789abcdef";
    std::string s;
    for (unsigned char b : md) {
        s += hex[b >> 4];
        s += hex[b & 15];
    }
    return s;
}

std::string_view reply_text(const redisReply* r) {
    if (!r) return {};
    if (r->type == REDIS_REPLY_STRING || r->type == REDIS_REPLY_STATUS ||
        r->type == REDIS_REPLY_ERROR) {
        return {r->str, r->len};
    }
    return {};
}

bool reply_is_error(const redisReply* r) {
    return !r || r->type == REDIS_REPLY_ERROR;
}

bool reply_is_nil(const redisReply* r) {
    return r && r->type == REDIS_REPLY_NIL;
}

long long reply_integer(const redisReply* r) {
    return r && r->type == REDIS_REPLY_INTEGER ? r->integer : 0;
}

// ------------------------------------------------------- the Asio adapter

// The socket hiredis owns, watched by the io_context. hiredis asks for read
// and write readiness through the ev hooks; the watcher outlives the
// context (handlers hold it) and `ctx` is cleared when hiredis cleans up.
struct client::watcher {
    redisAsyncContext* ctx = nullptr;
    net::posix::stream_descriptor sd;
    bool reading = false;
    bool writing = false;

    watcher(net::io_context& ioc, int fd) : sd(ioc, fd) {}

    static void arm_read(const std::shared_ptr<watcher>& w) {
        w->sd.async_wait(net::posix::descriptor_base::wait_read,
                         [w](error_code ec) {
                             if (ec || !w->ctx || !w->reading) return;
                             redisAsyncHandleRead(w->ctx);
                             if (w->ctx && w->reading) arm_read(w);
                         });
    }

    static void arm_write(const std::shared_ptr<watcher>& w) {
        w->sd.async_wait(net::posix::descriptor_base::wait_write,
                         [w](error_code ec) {
                             if (ec || !w->ctx || !w->writing) return;
                             redisAsyncHandleWrite(w->ctx);
                             if (w->ctx && w->writing) arm_write(w);
                         });
    }
};

namespace {

using watcher_ptr = std::shared_ptr<client::watcher>;

watcher_ptr& hook_watcher(void* priv) {
    return *static_cast<watcher_ptr*>(priv);
}

void add_read(void* priv) {
    auto& w = hook_watcher(priv);
    if (w->reading) return;
    w->reading = true;
    client::watcher::arm_read(w);
}

void del_read(void* priv) { hook_watcher(priv)->reading = false; }

void add_write(void* priv) {
    auto& w = hook_watcher(priv);
    if (w->writing) return;
    w->writing = true;
    client::watcher::arm_write(w);
}

void del_write(void* priv) { hook_watcher(priv)->writing = false; }

// hiredis is done with the socket (it closes it itself).
void cleanup(void* priv) {
    auto* holder = static_cast<watcher_ptr*>(priv);
    auto& w = *holder;
    w->ctx = nullptr;
    w->reading = w->writing = false;
    error_code ec;
    w->sd.cancel(ec);
    w->sd.release();
    delete holder;
}

struct pending {
    client* owner;
    std::shared_ptr<bool> alive;
    reply_fn done;
    bool internal;
};

}  // namespace

client::client(net::io_context& ioc, url u, std::string name)
    : ioc_(ioc), url_(std::move(u)), name_(std::move(name)), retry_(ioc),
      sweep_(ioc) {}

client::~client() {
    *alive_ = false;
    stop();
}

void client::start() {
    if (!stopped_) return;
    stopped_ = false;
    connect();
    check_timeouts();
}

void client::stop() {
    if (stopped_) return;
    stopped_ = true;
    retry_.cancel();
    sweep_.cancel();
    if (ctx_) {
        // Answers every pending command with a null reply.
        auto* c = ctx_;
        ctx_ = nullptr;
        redisAsyncFree(c);
    }
    up_ = false;
}

void client::connect() {
    if (stopped_) return;
    ctx_ = redisAsyncConnect(url_.host.c_str(), url_.port);
    if (!ctx_ || ctx_->err) {
        std::string why = ctx_ ? ctx_->errstr : "out of memory";
        if (ctx_) redisAsyncFree(ctx_);
        ctx_ = nullptr;
        if (!logged_down_) {
            PUSHY_WARN("{}: cannot connect to redis at {}: {}; retrying",
                       name_, url_.display(), why);
            logged_down_ = true;
        }
        return schedule_reconnect();
    }
    ctx_->data = this;
    auto w = std::make_shared<watcher>(ioc_, ctx_->c.fd);
    w->ctx = ctx_;
    watcher_ = w;
    ctx_->ev.data = new watcher_ptr(w);
    ctx_->ev.addRead = add_read;
    ctx_->ev.delRead = del_read;
    ctx_->ev.addWrite = add_write;
    ctx_->ev.delWrite = del_write;
    ctx_->ev.cleanup = cleanup;
    redisAsyncSetConnectCallback(
        ctx_, [](const redisAsyncContext* c, int status) {
            static_cast<client*>(c->data)->on_connected(status);
        });
    redisAsyncSetDisconnectCallback(
        ctx_, [](const redisAsyncContext* c, int status) {
            static_cast<client*>(c->data)->on_disconnected(status);
        });
}

void client::schedule_reconnect() {
    if (stopped_) return;
    retry_.expires_after(backoff_);
    backoff_ = std::min(backoff_ * 2, std::chrono::milliseconds(2000));
    retry_.async_wait([this, alive = alive_](error_code ec) {
        if (ec || !*alive) return;
        connect();
    });
}

void client::on_connected(int status) {
    if (status != REDIS_OK) {
        // hiredis frees the context after this callback.
        std::string why = ctx_ && ctx_->errstr ? ctx_->errstr : "refused";
        ctx_ = nullptr;
        if (!logged_down_) {
            PUSHY_WARN("{}: cannot connect to redis at {}: {}; retrying",
                       name_, url_.display(), why);
            logged_down_ = true;
        }
        return schedule_reconnect();
    }
    // AUTH and SELECT go first; the link counts as up once the last of
    // them (or a PING) has answered.
    auto cmds = hello_commands(url_);
    cmds.push_back({"PING"});
    for (std::size_t i = 0; i < cmds.size(); ++i) {
        std::vector<std::string_view> argv(cmds[i].begin(), cmds[i].end());
        bool last = i + 1 == cmds.size();
        std::string what = cmds[i][0];
        send(argv,
             [this, alive = alive_, last, what](redisReply* r) {
                 if (!*alive || stopped_) return;
                 if (reply_is_error(r)) {
                     if (r && ctx_) {
                         // Credentials changed since start: retry later
                         // rather than sit on a link we cannot use.
                         PUSHY_WARN("{}: redis at {} refused {}: {}; "
                                    "retrying",
                                    name_, url_.display(), what,
                                    reply_text(r));
                         auto* c = ctx_;
                         net::post(ioc_, [this, alive = alive_, c] {
                             if (*alive && ctx_ == c) redisAsyncFree(c);
                         });
                     }
                     return;
                 }
                 if (!last) return;
                 up_ = true;
                 backoff_ = std::chrono::milliseconds(100);
                 PUSHY_INFO("{}: connected to redis at {}", name_,
                            url_.display());
                 logged_down_ = false;
                 if (on_up_) on_up_();
             },
             true);
    }
}

void client::on_disconnected(int status) {
    bool was_up = up_.exchange(false);
    ctx_ = nullptr;
    sent_.clear();
    if (stopped_) return;
    if (was_up) {
        PUSHY_WARN("{}: lost redis at {}; reconnecting", name_,
                   url_.display());
        logged_down_ = true;
        if (on_down_) on_down_();
    }
    schedule_reconnect();
}

// Drops a link whose oldest command has waited too long: a server that
// stopped answering must not leave callers waiting forever.
void client::check_timeouts() {
    if (stopped_) return;
    if (ctx_ && !sent_.empty() &&
        clock::now() - sent_.front() > command_timeout) {
        PUSHY_WARN("{}: redis at {} did not answer within {} ms; "
                   "reconnecting",
                   name_, url_.display(), command_timeout.count());
        // Freeing a connected context answers every pending command with
        // a null reply and calls on_disconnected, which reconnects.
        redisAsyncFree(ctx_);
    }
    sweep_.expires_after(std::chrono::milliseconds(100));
    sweep_.async_wait([this, alive = alive_](error_code ec) {
        if (ec || !*alive) return;
        check_timeouts();
    });
}

void client::on_reply(redisAsyncContext* c, void* r, void* priv) {
    std::unique_ptr<pending> p(static_cast<pending*>(priv));
    if (*p->alive) {
        auto* self = p->owner;
        if (!self->sent_.empty()) self->sent_.pop_front();
    }
    p->done(static_cast<redisReply*>(r));
}

void client::send(const std::vector<std::string_view>& argv, reply_fn done,
                  bool internal) {
    if (!ctx_ || (!up_ && !internal)) {
        net::post(ioc_, [done = std::move(done)] { done(nullptr); });
        return;
    }
    std::vector<const char*> ptrs;
    std::vector<std::size_t> lens;
    ptrs.reserve(argv.size());
    lens.reserve(argv.size());
    for (auto a : argv) {
        ptrs.push_back(a.data());
        lens.push_back(a.size());
    }
    auto* p = new pending{this, alive_, std::move(done), internal};
    if (redisAsyncCommandArgv(ctx_, &client::on_reply, p,
                              static_cast<int>(ptrs.size()), ptrs.data(),
                              lens.data()) != REDIS_OK) {
        auto d = std::move(p->done);
        delete p;
        net::post(ioc_, [d = std::move(d)] { d(nullptr); });
        return;
    }
    sent_.push_back(clock::now());
}

void client::command(const std::vector<std::string_view>& argv,
                     reply_fn done) {
    send(argv, std::move(done), false);
}

void client::eval(const std::string& script, const std::string& sha1,
                  const std::vector<std::string_view>& keys,
                  const std::vector<std::string_view>& args, reply_fn done) {
    auto nkeys = std::to_string(keys.size());
    std::vector<std::string_view> argv{"EVALSHA", sha1, nkeys};
    argv.insert(argv.end(), keys.begin(), keys.end());
    argv.insert(argv.end(), args.begin(), args.end());
    // The retry needs its own copies: the caller's views end with this call.
    std::vector<std::string> again{"EVAL", script, nkeys};
    again.insert(again.end(), keys.begin(), keys.end());
    again.insert(again.end(), args.begin(), args.end());
    command(argv, [this, alive = alive_, again = std::move(again),
                   done = std::move(done)](redisReply* r) mutable {
        if (*alive && r && r->type == REDIS_REPLY_ERROR &&
            reply_text(r).starts_with("NOSCRIPT")) {
            std::vector<std::string_view> argv(again.begin(), again.end());
            return command(argv, std::move(done));
        }
        done(r);
    });
}

}  // namespace pushy::redis
