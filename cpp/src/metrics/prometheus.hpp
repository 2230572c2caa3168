// GET /metrics: the node's /v1/stats document in the Prometheus text format
// (prometheus-cpp's serializer), so the two never disagree.
//
// Every number of the document becomes a metric named pushy_ and its path
// (pushy_fleet_kicks_sent_total); counts are counters (_total), the
// connection count, the uptime and the drain's figures are gauges. Objects
// of counts by outcome, reason or code become one family with that label
// (pushy_pushes_total{outcome="delivered"}); a latency histogram becomes a
// histogram in seconds. Every metric carries node="<node id>".
//
// Threading: any thread; `parser` is the caller's (one per io thread).
#pragma once

#include <simdjson.h>

#include <string>
#include <string_view>

namespace pushy::metrics {

// The text exposition of `stats_json`; empty if it does not parse.
std::string prometheus_text(std::string_view stats_json,
                            simdjson::dom::parser& parser);

}  // namespace pushy::metrics
