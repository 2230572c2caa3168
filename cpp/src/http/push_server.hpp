// The internal push API (HTTP/1.1 on the push port):
//
//   POST /v1/push          one push, answered with its outcome
//   POST /v1/push/batch    {"pushes":[...]}, one result each, in order
//   GET  /v1/devices/{id}  is the device connected here?
//   GET  /healthz          liveness
//   GET  /v1/stats         counters as JSON
//
// Threading: each HTTP connection lives on one io thread; a push is posted
// to the device's thread and its outcome posted back.
#pragma once

#include <boost/asio/ip/tcp.hpp>

namespace pushy {

class node_impl;
struct io_thread;

// Serves one accepted HTTP connection until it closes. Call on `thread`.
void start_http_session(node_impl& node, io_thread& thread,
                        boost::asio::ip::tcp::socket socket);

}  // namespace pushy
