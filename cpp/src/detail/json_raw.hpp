// The exact text of a JSON value inside a parsed document, so payloads
// pass through as the sender wrote them (validated, never re-encoded).
#pragma once

#include <simdjson.h>

#include <string_view>

namespace pushy::json {

// The text of `v`, trailing blanks removed. simdjson 3.0 gives raw_json()
// to objects and arrays only; a scalar's token is its text.
simdjson::error_code raw_text(simdjson::ondemand::value v,
                              std::string_view& out);

}  // namespace pushy::json
