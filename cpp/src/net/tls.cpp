#include "net/tls.hpp"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "core/logging.hpp"
#include "pushy/config.hpp"

namespace pushy::tls {

namespace net = boost::asio;
using boost::system::error_code;

namespace {

// Why the last plain socket operation of this thread failed (OpenSSL's
// failures are in its own error queue).
thread_local std::string socket_reason;

// The first error in OpenSSL's queue as text, and the queue cleared.
std::string take_openssl_error() {
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    if (e == 0) return {};
    const char* reason = ERR_reason_error_string(e);
    if (reason) return reason;
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    return buf;
}

// Maps the result `r` of an SSL_* call on `ssl` to where it stands.
io status_of(SSL* ssl, int r) {
    switch (SSL_get_error(ssl, r)) {
        case SSL_ERROR_WANT_READ: return io::want_read;
        case SSL_ERROR_WANT_WRITE: return io::want_write;
        // A close_notify, or (SSL_OP_IGNORE_UNEXPECTED_EOF) a TCP FIN
        // without one: devices that vanish are normal.
        case SSL_ERROR_ZERO_RETURN: return io::closed;
        case SSL_ERROR_SYSCALL:
            if (ERR_peek_error() == 0) {
                if (errno == 0) return io::closed;
                socket_reason = std::string("socket: ") + std::strerror(errno);
            }
            return io::failed;
        default: return io::failed;
    }
}

// Maps a plain socket operation's error code.
io status_of(const error_code& ec) {
    if (!ec) return io::ok;
    if (ec == net::error::would_block || ec == net::error::try_again) {
        return io::want_read;  // the caller swaps in want_write for writes
    }
    if (ec == net::error::eof) return io::closed;
    socket_reason = "socket: " + ec.message();
    return io::failed;
}

// The pass phrase callback: there is none to give (a node never prompts).
// Records that one was asked for, so the error can say the key is
// encrypted.
int no_pass_phrase(char*, int, int, void* asked) {
    *static_cast<bool*>(asked) = true;
    return -1;
}

[[noreturn]] void fail(const std::string& what) {
    std::string why = take_openssl_error();
    throw config_error(what + (why.empty() ? "" : ": " + why));
}

}  // namespace

context::context(const std::string& cert_file, const std::string& key_file)
    : ctx_(SSL_CTX_new(TLS_server_method())) {
    if (!ctx_) fail("cannot create a TLS context");
    try {
        if (SSL_CTX_use_certificate_chain_file(ctx_, cert_file.c_str()) != 1) {
            fail("tls_cert '" + cert_file +
                 "' is not a readable PEM certificate chain");
        }
        // OpenSSL would prompt on the terminal for an encrypted key.
        bool asked = false;
        SSL_CTX_set_default_passwd_cb(ctx_, no_pass_phrase);
        SSL_CTX_set_default_passwd_cb_userdata(ctx_, &asked);
        int loaded = SSL_CTX_use_PrivateKey_file(ctx_, key_file.c_str(),
                                                 SSL_FILETYPE_PEM);
        SSL_CTX_set_default_passwd_cb_userdata(ctx_, nullptr);
        if (loaded != 1) {
            if (asked) {
                ERR_clear_error();
                throw config_error(
                    "tls_key '" + key_file +
                    "' is encrypted; the node takes an unencrypted key "
                    "(openssl pkey -in " + key_file + " -out key.pem)");
            }
            if (ERR_GET_REASON(ERR_peek_last_error()) ==
                X509_R_KEY_VALUES_MISMATCH) {
                ERR_clear_error();
                throw config_error("tls_key '" + key_file +
                                   "' does not match the certificate of "
                                   "tls_cert");
            }
            fail("tls_key '" + key_file +
                 "' is not a readable PEM private key");
        }
        if (SSL_CTX_check_private_key(ctx_) != 1) {
            fail("tls_key '" + key_file +
                 "' does not match the certificate of tls_cert");
        }
        // Served all the same (a renewed file is read at the next start),
        // but devices that check certificates will refuse it.
        if (X509* leaf = SSL_CTX_get0_certificate(ctx_)) {
            if (X509_cmp_current_time(X509_get0_notAfter(leaf)) <= 0) {
                PUSHY_WARN("tls_cert '{}' has expired: devices that check "
                           "certificates will refuse it", cert_file);
            } else if (X509_cmp_current_time(X509_get0_notBefore(leaf)) > 0) {
                PUSHY_WARN("tls_cert '{}' is not valid yet: devices that "
                           "check certificates will refuse it", cert_file);
            }
        }
    } catch (...) {
        SSL_CTX_free(ctx_);
        throw;
    }
    SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
    // Idle connections keep no record buffers; a write that the kernel
    // does not take whole is resumed from the session's own buffer, which
    // may have moved or grown in between.
    SSL_CTX_set_mode(ctx_, SSL_MODE_RELEASE_BUFFERS |
                               SSL_MODE_ENABLE_PARTIAL_WRITE |
                               SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    // One recv() takes every record the kernel holds, not a header and then
    // a body: half the system calls for small messages.
    SSL_CTX_set_read_ahead(ctx_, 1);
    // No resumption: in TLS 1.3 a resumed handshake still pays the key
    // exchange, and issuing tickets made every full handshake about a third
    // dearer (measured: 282 against 382 us of CPU with two tickets).
    // Devices reconnect every lifetime (30 minutes), long after a cache
    // entry would be useful.
    SSL_CTX_set_num_tickets(ctx_, 0);
    SSL_CTX_set_session_cache_mode(ctx_, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_options(ctx_, SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION |
                                  SSL_OP_CIPHER_SERVER_PREFERENCE |
                                  SSL_OP_IGNORE_UNEXPECTED_EOF);
    // X25519 first: the cheapest key exchange here (P-256 cost 40% more
    // CPU per handshake).
    SSL_CTX_set1_groups_list(ctx_, "X25519:P-256:P-384");
}

context::~context() { SSL_CTX_free(ctx_); }

SSL* context::accept_on(int fd) const {
    SSL* ssl = SSL_new(ctx_);
    if (!ssl) return nullptr;
    if (SSL_set_fd(ssl, fd) != 1) {
        SSL_free(ssl);
        return nullptr;
    }
    SSL_set_accept_state(ssl);
    return ssl;
}

io handshake(SSL* ssl) {
    ERR_clear_error();
    errno = 0;
    int r = SSL_do_handshake(ssl);
    if (r == 1) return io::ok;
    io s = status_of(ssl, r);
    // A peer that leaves in the middle of the handshake has failed it.
    return s == io::closed ? io::failed : s;
}

io read_some(net::ip::tcp::socket& socket, SSL* ssl, char* buf,
             std::size_t size, std::size_t& n) {
    n = 0;
    if (!ssl) {
        error_code ec;
        n = socket.read_some(net::buffer(buf, size), ec);
        return status_of(ec);
    }
    ERR_clear_error();
    errno = 0;
    int r = SSL_read_ex(ssl, buf, size, &n);
    return r == 1 ? io::ok : status_of(ssl, r);
}

io write_some(net::ip::tcp::socket& socket, SSL* ssl, const char* buf,
              std::size_t size, std::size_t& n) {
    n = 0;
    if (!ssl) {
        error_code ec;
        n = socket.write_some(net::buffer(buf, size), ec);
        io s = status_of(ec);
        return s == io::want_read ? io::want_write : s;
    }
    ERR_clear_error();
    errno = 0;
    int r = SSL_write_ex(ssl, buf, size, &n);
    return r == 1 ? io::ok : status_of(ssl, r);
}

bool pending(SSL* ssl) { return ssl && SSL_has_pending(ssl) == 1; }

void shutdown(SSL* ssl) {
    if (!ssl) return;
    ERR_clear_error();
    SSL_shutdown(ssl);
    ERR_clear_error();
}

void release(SSL* ssl) { SSL_free(ssl); }

std::string last_error() {
    std::string why = take_openssl_error();
    if (why.empty()) why = std::exchange(socket_reason, {});
    return why.empty() ? "connection closed" : why;
}

}  // namespace pushy::tls
