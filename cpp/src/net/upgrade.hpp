// The HTTP part of a device connection: reads the upgrade request, checks
// it (RFC 6455 section 4.2.1), authenticates the token, answers 101 or an
// error, and hands the socket to a session.
//
// An upgrade object lives only for the handshake; its buffers and parser
// go away with it, so they cost nothing once the device is connected.
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
