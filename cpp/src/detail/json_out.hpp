// Writing the few JSON documents the node emits itself (hello, status,
// push frames, API responses). Parsing is simdjson's job; this only escapes
// strings per RFC 8259 section 7 and formats numbers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace pushy::json {

// Appends `v` as a quoted JSON string. Control characters, quote and
// backslash are escaped; other bytes (valid UTF-8) pass through.
void append_string(std::string& out, std::string_view v);

// Appends a finite number; non-finite values become 0.
void append_number(std::string& out, double v);

}  // namespace pushy::json
