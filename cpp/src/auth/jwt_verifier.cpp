// Device-token verification: structure, header and claims are read here
// with simdjson; libjwt 1.10 checks the signature.
//
// libjwt is never trusted with the algorithm. Its jwt_decode() takes `alg`
// from the token itself, matches it case-insensitively, keeps the last of
// duplicated members, and, given an RS256 public key, verifies an "HS256"
// token using the PEM text as the HMAC secret. So the header is decoded
// and its `alg` compared here first, duplicates are refused, and the
// algorithm libjwt actually used is compared again afterwards.
#include "auth/jwt_verifier.hpp"

#include <jwt.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <simdjson.h>

#include <array>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <utility>

#include "detail/json_raw.hpp"
#include "pushy/config.hpp"

namespace pushy::auth {
namespace {

namespace dom = simdjson::dom;

// Frees a libjwt object.
struct jwt_deleter {
    void operator()(jwt_t* j) const noexcept { jwt_free(j); }
};
using jwt_ptr = std::unique_ptr<jwt_t, jwt_deleter>;

// Frees an OpenSSL memory BIO.
struct bio_deleter {
    void operator()(BIO* b) const noexcept { BIO_free(b); }
};

// Frees an OpenSSL key.
struct pkey_deleter {
    void operator()(EVP_PKEY* k) const noexcept { EVP_PKEY_free(k); }
};

// Drops the OpenSSL errors queued on this thread during its lifetime.
// libjwt leaves errors behind when a PEM key or an RSA/EC signature fails;
// left queued they would be misread by the next TLS call on the thread
// (SSL_get_error looks at the queue).
class openssl_error_scope {
public:
    openssl_error_scope() noexcept { ERR_set_mark(); }
    ~openssl_error_scope() { ERR_pop_to_mark(); }
    openssl_error_scope(const openssl_error_scope&) = delete;
    openssl_error_scope& operator=(const openssl_error_scope&) = delete;
};

// The algorithms a node accepts, by their exact JWS names (RFC 7518
// section 3.1).
struct algorithm_entry {
    std::string_view name;
    jwt_alg_t alg;
};
constexpr std::array<algorithm_entry, 5> algorithms{{
    {"HS256", JWT_ALG_HS256},
    {"HS384", JWT_ALG_HS384},
    {"HS512", JWT_ALG_HS512},
    {"RS256", JWT_ALG_RS256},
    {"ES256", JWT_ALG_ES256},
}};

// Returns the libjwt id of `name`; throws config_error if unsupported.
jwt_alg_t algorithm_id(const std::string& name) {
    for (const auto& entry : algorithms) {
        if (entry.name == name) return entry.alg;
    }
    throw config_error("unsupported token algorithm \"" + name +
                       "\": expected HS256, HS384, HS512, RS256 or ES256");
}

// Whether `alg` is an HMAC algorithm (shared secret, no PEM key).
bool is_hmac(jwt_alg_t alg) noexcept {
    return alg == JWT_ALG_HS256 || alg == JWT_ALG_HS384 ||
           alg == JWT_ALG_HS512;
}

// Checks that `pem` holds a public key libjwt can use for `alg`: it must
// load with PEM_read_bio_PUBKEY (what libjwt calls) and be an RSA key for
// RS256 or a P-256 key for ES256. Throws config_error otherwise.
void check_public_key(const std::string& pem, jwt_alg_t alg,
                      const std::string& alg_name) {
    openssl_error_scope errors;
    std::unique_ptr<BIO, bio_deleter> bio(
        BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
    if (!bio) throw config_error("cannot read the token public key");

    // A null password callback: a public key never asks for one.
    std::unique_ptr<EVP_PKEY, pkey_deleter> key(
        PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr));
    if (!key) {
        throw config_error(alg_name +
                           " needs a PEM public key");
    }
    if (alg == JWT_ALG_RS256) {
        if (EVP_PKEY_get_base_id(key.get()) != EVP_PKEY_RSA) {
            throw config_error("RS256 needs an RSA public key");
        }
        return;
    }
    char group[64] = {};
    std::size_t group_len = 0;
    if (EVP_PKEY_get_base_id(key.get()) != EVP_PKEY_EC ||
        EVP_PKEY_get_group_name(key.get(), group, sizeof group,
                                &group_len) != 1 ||
        std::string_view(group, group_len) != "prime256v1") {
        throw config_error("ES256 needs a P-256 (prime256v1) public key");
    }
}

// Value of each byte as a base64url digit (RFC 4648 section 5), or -1.
constexpr std::array<std::int8_t, 256> make_b64url_table() {
    std::array<std::int8_t, 256> table{};
    for (auto& v : table) v = -1;
    constexpr std::string_view digits =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    for (std::size_t i = 0; i < digits.size(); ++i) {
        table[static_cast<unsigned char>(digits[i])] =
            static_cast<std::int8_t>(i);
    }
    return table;
}
constexpr auto b64url_table = make_b64url_table();

// Whether `s` is unpadded base64url of a length that can occur (a length
// of 1 mod 4 encodes no whole byte).
bool is_b64url(std::string_view s) noexcept {
    if (s.size() % 4 == 1) return false;
    for (unsigned char c : s) {
        if (b64url_table[c] < 0) return false;
    }
    return true;
}

// Decodes `in`, already checked with is_b64url(), into `out`, leaving the
// spare capacity simdjson reads past the end so it need not copy.
void b64url_decode(std::string_view in, std::string& out) {
    out.clear();
    out.reserve(in.size() / 4 * 3 + 2 + simdjson::SIMDJSON_PADDING);
    std::uint32_t acc = 0;
    int bits = 0;
    for (unsigned char c : in) {
        acc = (acc << 6) | static_cast<std::uint32_t>(b64url_table[c]);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out.push_back(static_cast<char>((acc >> bits) & 0xFF));
        }
    }
}

// Splits `token` into its three dot-separated segments; false unless
// there are exactly three and each is base64url.
bool split_token(std::string_view token,
                 std::array<std::string_view, 3>& parts) noexcept {
    const auto first = token.find('.');
    if (first == std::string_view::npos) return false;
    const auto second = token.find('.', first + 1);
    if (second == std::string_view::npos) return false;
    if (token.find('.', second + 1) != std::string_view::npos) return false;
    parts[0] = token.substr(0, first);
    parts[1] = token.substr(first + 1, second - first - 1);
    parts[2] = token.substr(second + 1);
    for (auto part : parts) {
        if (!is_b64url(part)) return false;
    }
    return true;
}

// Decodes a base64url segment and parses it as a JSON object into `out`.
// `out` points into `parser` and stays valid until its next parse.
bool parse_object(dom::parser& parser, std::string_view segment,
                  std::string& buffer, dom::object& out) {
    b64url_decode(segment, buffer);
    dom::element doc;
    if (parser.parse(buffer).get(doc)) return false;
    return !doc.get_object().get(out);
}

// Reads the header's `alg` into `alg`; false when it is absent, not a
// string or present twice. Member names are compared after unescaping,
// so "\u0061lg" counts as a second `alg`.
bool read_header_alg(dom::object header, std::string& alg) {
    bool seen = false;
    for (auto field : header) {
        if (field.key != "alg") continue;
        std::string_view value;
        if (seen || field.value.get_string().get(value)) return false;
        alg.assign(value);
        seen = true;
    }
    return seen;
}

// The claims verify() reads, still as JSON values; null when absent.
struct raw_claims {
    dom::element sub;
    dom::element acc;
    dom::element exp;
    dom::element aud;
    dom::element meta;
    bool has_sub = false;
    bool has_acc = false;
    bool has_exp = false;
    bool has_aud = false;
    bool has_meta = false;
};

// Picks `sub`, `acc`, `exp`, `aud` and `meta` out of the payload; false
// when one of them appears twice (RFC 7519 section 4 lets a parser reject
// that).
bool read_claims(dom::object payload, raw_claims& out) {
    for (auto field : payload) {
        dom::element* slot = nullptr;
        bool* seen = nullptr;
        if (field.key == "sub") {
            slot = &out.sub;
            seen = &out.has_sub;
        } else if (field.key == "acc") {
            slot = &out.acc;
            seen = &out.has_acc;
        } else if (field.key == "exp") {
            slot = &out.exp;
            seen = &out.has_exp;
        } else if (field.key == "aud") {
            slot = &out.aud;
            seen = &out.has_aud;
        } else if (field.key == "meta") {
            slot = &out.meta;
            seen = &out.has_meta;
        } else {
            continue;
        }
        if (*seen) return false;
        *slot = field.value;
        *seen = true;
    }
    return true;
}

// Converts a NumericDate (RFC 7519 section 2) to whole seconds, rounding
// a fraction up so that `result <= now` matches `exp <= now` for whole
// `now`, and clamping to the int64 range. False when not a number.
bool read_numeric_date(dom::element value, std::int64_t& out) {
    constexpr auto max = std::numeric_limits<std::int64_t>::max();
    constexpr auto min = std::numeric_limits<std::int64_t>::min();
    switch (value.type()) {
        case dom::element_type::INT64:
            out = value.get_int64().value_unsafe();
            return true;
        case dom::element_type::UINT64:
            // Only values above the int64 range are typed unsigned.
            out = max;
            return true;
        case dom::element_type::DOUBLE: {
            const double d = std::ceil(value.get_double().value_unsafe());
            // 2^63 is exact as a double; anything at or above it clamps.
            if (d >= 9223372036854775808.0) {
                out = max;
            } else if (d < -9223372036854775808.0) {
                out = min;
            } else {
                out = static_cast<std::int64_t>(d);
            }
            return true;
        }
        default:
            return false;
    }
}

// Whether `aud` (a string or an array of strings) contains `audience`.
// Non-string array elements never match.
bool audience_matches(dom::element aud, std::string_view audience) {
    std::string_view value;
    if (!aud.get_string().get(value)) return value == audience;
    dom::array list;
    if (aud.get_array().get(list)) return false;
    for (auto item : list) {
        if (!item.get_string().get(value) && value == audience) return true;
    }
    return false;
}

// Copies the exact text of the payload's `meta` object into `out`: the
// bytes the issuer signed, not a re-encoding. `payload` is the decoded
// payload with simdjson's padding in its spare capacity. False when
// `meta` is not an object or its text is longer than max_meta_bytes.
// Member names are unescaped before the comparison, as read_claims()
// does, so both find the same member.
bool read_meta(const std::string& payload, std::string& out) {
    namespace od = simdjson::ondemand;
    thread_local od::parser parser;
    od::document doc;
    od::object top;
    if (parser.iterate(payload.data(), payload.size(), payload.capacity())
            .get(doc) ||
        doc.get_object().get(top)) {
        return false;
    }
    for (auto field : top) {
        std::string_view key;
        if (field.unescaped_key().get(key)) return false;
        if (key != "meta") continue;
        od::value value;
        od::json_type type;
        std::string_view text;
        if (field.value().get(value) || value.type().get(type) ||
            type != od::json_type::object || json::raw_text(value, text)) {
            return false;
        }
        if (text.size() > max_meta_bytes) return false;
        out.assign(text);
        return true;
    }
    return false;
}

// Whether libjwt can parse `token` at all, ignoring the signature. Used
// only after a failed verification, to tell a token libjwt refuses to
// read (a non-"JWT" typ, JSON jansson rejects) from a bad signature. The
// object it returns is freed at once and never trusted.
bool libjwt_can_parse(const std::string& token) {
    openssl_error_scope errors;
    jwt_t* raw = nullptr;
    const int rc = jwt_decode(&raw, token.c_str(), nullptr, 0);
    jwt_ptr decoded(raw);
    return rc == 0;
}

// The parser of the calling thread; a dom::parser is not thread-safe and
// keeps its buffers between tokens.
dom::parser& thread_parser() {
    thread_local dom::parser parser;
    return parser;
}

// Builds a result carrying only `error`.
verify_result reject(token_error error) {
    verify_result result;
    result.error = error;
    return result;
}

}  // namespace

// Returns the reason text sent in the HTTP 401 body.
std::string_view describe(token_error e) noexcept {
    switch (e) {
        case token_error::none: return "ok";
        case token_error::missing: return "missing token";
        case token_error::malformed: return "malformed token";
        case token_error::bad_signature: return "bad signature";
        case token_error::wrong_algorithm: return "wrong algorithm";
        case token_error::expired: return "token expired";
        case token_error::no_expiry: return "token has no exp (expiry)";
        case token_error::no_device: return "token has no sub (device id)";
        case token_error::long_device:
            return "token sub (device id) is longer than 256 bytes";
        case token_error::bad_audience: return "wrong audience";
        case token_error::bad_meta:
            return "token meta must be a JSON object of at most 1024 bytes";
    }
    return "invalid token";
}

// Returns the metric name counting rejections for `e`.
std::string_view metric_name(token_error e) noexcept {
    switch (e) {
        case token_error::none: return "token_ok";
        case token_error::missing: return "token_missing";
        case token_error::malformed: return "token_malformed";
        case token_error::bad_signature: return "token_bad_signature";
        case token_error::wrong_algorithm: return "token_wrong_algorithm";
        case token_error::expired: return "token_expired";
        case token_error::no_expiry: return "token_no_expiry";
        case token_error::no_device: return "token_no_device";
        case token_error::long_device: return "token_no_device";
        case token_error::bad_audience: return "token_bad_audience";
        case token_error::bad_meta: return "token_bad_meta";
    }
    return "token_invalid";
}

// Stores the configuration after checking that the algorithm is supported
// and the key fits it; throws config_error otherwise. The key is never
// put in a message.
jwt_verifier::jwt_verifier(std::string algorithm, std::string key,
                           std::string audience)
    : algorithm_(std::move(algorithm)),
      key_(std::move(key)),
      audience_(std::move(audience)) {
    const jwt_alg_t alg = algorithm_id(algorithm_);
    alg_ = alg;
    if (key_.empty()) {
        throw config_error(algorithm_ + (is_hmac(alg)
                                             ? " needs a non-empty secret"
                                             : " needs a PEM public key"));
    }

    // libjwt takes the key length as an int.
    if (key_.size() > static_cast<std::size_t>(INT_MAX)) {
        throw config_error("the token key is too long");
    }
    if (is_hmac(alg)) {
        if (key_.starts_with("-----BEGIN")) {
            throw config_error(algorithm_ +
                               " needs a shared secret, not a PEM key");
        }
        return;
    }
    check_public_key(key_, alg, algorithm_);
}

// Classifies `token` in the order documented in the header and returns
// its claims when it is accepted.
verify_result jwt_verifier::verify(std::string_view token,
                                   std::int64_t now) const {
    if (token.empty()) return reject(token_error::missing);

    std::array<std::string_view, 3> parts;
    if (!split_token(token, parts)) return reject(token_error::malformed);

    // The header is read before the payload: both use one parser, and
    // each parse invalidates the previous document.
    dom::parser& parser = thread_parser();
    std::string buffer;
    dom::object header;
    std::string alg;
    if (!parse_object(parser, parts[0], buffer, header) ||
        !read_header_alg(header, alg)) {
        return reject(token_error::malformed);
    }
    dom::object payload;
    raw_claims raw;
    if (!parse_object(parser, parts[1], buffer, payload) ||
        !read_claims(payload, raw)) {
        return reject(token_error::malformed);
    }

    // RFC 8725 section 3.1: the verifier, not the token, picks the
    // algorithm, and it is settled before any key is used.
    if (alg != algorithm_) return reject(token_error::wrong_algorithm);

    // jwt_decode() needs a NUL-terminated string; the token has no NUL
    // (every byte is base64url or a dot).
    const std::string text(token);
    {
        openssl_error_scope errors;
        jwt_t* out = nullptr;
        const int rc = jwt_decode(
            &out, text.c_str(),
            reinterpret_cast<const unsigned char*>(key_.data()),
            static_cast<int>(key_.size()));
        jwt_ptr decoded(out);
        if (rc != 0) {
            return reject(libjwt_can_parse(text) ? token_error::bad_signature
                                                 : token_error::malformed);
        }

        // Unreachable while duplicate `alg` members are refused above;
        // kept so that a parser disagreement can never pick the key's use.
        if (jwt_get_alg(decoded.get()) != static_cast<jwt_alg_t>(alg_)) {
            return reject(token_error::wrong_algorithm);
        }
    }

    verify_result result;
    std::string_view account;
    if (raw.has_acc && raw.acc.get_string().get(account)) {
        return reject(token_error::malformed);
    }
    if (!raw.has_exp) return reject(token_error::no_expiry);
    if (!read_numeric_date(raw.exp, result.claims.expires_at)) {
        return reject(token_error::malformed);
    }
    if (result.claims.expires_at <= now) return reject(token_error::expired);
    std::string_view device;
    if (!raw.has_sub || raw.sub.get_string().get(device) || device.empty()) {
        return reject(token_error::no_device);
    }
    if (device.size() > max_device_bytes) {
        return reject(token_error::long_device);
    }
    if (!audience_.empty() &&
        (!raw.has_aud || !audience_matches(raw.aud, audience_))) {
        return reject(token_error::bad_audience);
    }
    // `buffer` still holds the decoded payload (parsed last).
    if (raw.has_meta && !read_meta(buffer, result.claims.meta)) {
        return reject(token_error::bad_meta);
    }
    result.claims.device.assign(device);
    result.claims.account.assign(account);
    return result;
}

}  // namespace pushy::auth
