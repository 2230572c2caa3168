// The start of a device connection: the TLS handshake when the node has
// TLS (within tls_handshake_timeout_s), then the upgrade request (within
// upgrade_timeout_s), checked (RFC 6455 section 4.2.1) and authenticated;
// it answers with an error, or hands the socket (and its TLS state) to a
// session, which sends the 101 with hello.
//
// An upgrade object lives only for the handshake; its buffers and parser
// go away with it, so they cost nothing once the device is connected. Its
// deadlines are an entry on the thread's timer wheel, not a timer.
//
// Threading: runs on the io thread it was created on.
#pragma once

#include <boost/asio/ip/tcp.hpp>

#include <memory>

namespace pushy {

class node_impl;
struct io_thread;

// Starts the handshake on an accepted socket. Call on `thread`.
void start_upgrade(node_impl& node, io_thread& thread,
                   boost::asio::ip::tcp::socket socket);

}  // namespace pushy
