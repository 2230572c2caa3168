// TLS on the device port (wss://): the node's context, and the
// non-blocking reads and writes of a connection, plain or TLS.
//
// OpenSSL works on the socket's descriptor itself (a socket BIO: no memory
// BIOs, no copies). A TLS connection waits for readability without a
// buffer like a plain one, and SSL_MODE_RELEASE_BUFFERS frees OpenSSL's
// record buffers whenever they are empty, so an idle TLS connection costs
// its SSL object (about 14 KB with OpenSSL 3.0) and nothing more.
//
// Threading: the context is shared by every io thread (OpenSSL makes
// SSL_new thread-safe on one SSL_CTX); an SSL object belongs to the io
// thread of its connection. The functions here clear the calling thread's
// OpenSSL error queue before each operation, as SSL_get_error requires.
#pragma once

#include <boost/asio/ip/tcp.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

// OpenSSL's types, without its headers in every file that holds one.
struct ssl_st;
struct ssl_ctx_st;

namespace pushy::tls {

using SSL = ::ssl_st;

// Where a non-blocking operation stands.
enum class io : std::uint8_t {
    ok,          // done (for reads and writes: `n` bytes)
    want_read,   // call again once the socket is readable
    want_write,  // call again once the socket is writable
    closed,      // the peer closed (EOF, or a TLS close_notify)
    failed,      // a socket or TLS error; see last_error()
};

// The node's TLS configuration: certificate chain and key, TLS 1.2 and
// 1.3 only, no renegotiation, no session resumption.
class context {
public:
    // Loads the PEM certificate chain (leaf first) and the PEM private key
    // and checks that they match. Throws config_error naming the file and
    // OpenSSL's reason.
    context(const std::string& cert_file, const std::string& key_file);
    ~context();
    context(const context&) = delete;
    context& operator=(const context&) = delete;

    // A new server-side TLS connection on socket descriptor `fd`, to be
    // driven by handshake(); null when OpenSSL is out of memory. The caller
    // owns it (release()).
    SSL* accept_on(int fd) const;

private:
    ssl_ctx_st* ctx_;
};

// Advances the server handshake of `ssl`.
io handshake(SSL* ssl);

// Reads at most `size` bytes into `buf` from the socket, through `ssl`
// when it is not null; `n` is the count read (for ok).
io read_some(boost::asio::ip::tcp::socket& socket, SSL* ssl, char* buf,
             std::size_t size, std::size_t& n);

// Writes at most `size` bytes of `buf`; `n` is the count written (for ok).
// Through TLS, a write that answered want_write must be called again with
// the same bytes at the start of `buf` (they may have moved, and more may
// follow) and at least as many of them: OpenSSL has already framed them
// into a record.
io write_some(boost::asio::ip::tcp::socket& socket, SSL* ssl,
              const char* buf, std::size_t size, std::size_t& n);

// Whether OpenSSL holds bytes of `ssl` already read from the socket: a
// reader must read again before it waits for the socket. False for null.
bool pending(SSL* ssl);

// Sends the TLS close_notify once, without waiting for the peer's.
void shutdown(SSL* ssl);

// Frees `ssl` (null is fine).
void release(SSL* ssl);

// The reason of the last failure on this thread, for logs ("wrong version
// number", "socket: connection reset by peer", ...), and clears it.
std::string last_error();

}  // namespace pushy::tls
