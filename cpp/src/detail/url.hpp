// Small helpers for request targets (RFC 3986).
#pragma once

#include <string>
#include <string_view>

namespace pushy::url {

// Decodes %XX escapes; a malformed escape is kept as it is and '+' is not
// a space (device ids and JWTs never use it for one).
std::string percent_decode(std::string_view s);

// The decoded value of query parameter `name` in a request target, or empty
// when it is absent.
std::string query_param(std::string_view target, std::string_view name);

}  // namespace pushy::url
