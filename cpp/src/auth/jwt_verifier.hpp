// Verifies device tokens (JWT) presented at the WebSocket upgrade.
//
// A token is accepted when it is well formed, signed with the configured
// algorithm and key, not expired, names a device (`sub`) and, when an
// audience is configured, carries it in `aud`. Every rejection has a short
// lower-case reason that the node returns in the HTTP 401 body.
//
// Checks run in this order; the first that fails names the error:
//   1. missing: the token is empty.
//   2. malformed: not three base64url segments (RFC 7515 section 7.1, no
//      padding); header or payload not a JSON object; header `alg` absent,
//      not a string or given twice; a claim this class reads (`sub`,
//      `acc`, `exp`, `aud`, `meta`) given twice.
//   3. wrong_algorithm: header `alg` is not exactly the configured one
//      (case-sensitive; "none" is never accepted). Decided from the
//      decoded header before any signature work.
//   4. bad_signature: the signature does not verify with the key.
//   5. malformed: `exp` is not a number or `acc` is not a string.
//   6. expired: `exp` is present and `exp <= now`. A fractional `exp`
//      counts from the next whole second. no_expiry: `exp` is absent (a
//      stolen token without one would be good for ever).
//   7. no_device: `sub` is absent, not a string or empty; long_device: it
//      is longer than max_device_bytes (a push could not name it).
//   8. bad_audience: an audience is configured and `aud` (a string or an
//      array of strings) does not contain it.
//   9. bad_meta: `meta` is present and is not a JSON object, or its JSON
//      text is longer than max_meta_bytes.
//
// Limitations: `nbf` and `iat` are not checked. libjwt 1.10 refuses a
// header `typ` other than "JWT" (any case) and JSON its parser (jansson)
// refuses, such as "\u0000" in a string or an integer beyond 64 bits;
// such tokens are malformed.
//
// Thread safety: verify() is const and may be called from any thread.
// Cost: RS256/ES256 re-read the PEM key on every call (libjwt 1.10 keeps
// no parsed key), so verify() belongs on the upgrade path only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace pushy::auth {

enum class token_error {
    none,
    missing,        // "missing token"
    malformed,      // "malformed token"
    bad_signature,  // "bad signature"
    wrong_algorithm,// "wrong algorithm"
    expired,        // "token expired"
    no_expiry,      // "token has no exp (expiry)"
    no_device,      // "token has no sub (device id)"
    long_device,    // "token sub (device id) is longer than 256 bytes"
    bad_audience,   // "wrong audience"
    bad_meta,       // "token meta must be a JSON object of at most 1024 bytes"
};

// The longest `meta` claim accepted, in bytes of its JSON text.
inline constexpr std::size_t max_meta_bytes = 1024;

// The reason text for an error (lower case, no trailing period).
std::string_view describe(token_error e) noexcept;

// Short stable name for metrics, e.g. "token_expired".
std::string_view metric_name(token_error e) noexcept;

struct claims {
    std::string device;   // sub
    std::string account;  // acc (may be empty)
    std::int64_t expires_at = 0;  // exp, seconds since the epoch; 0: none
    // The JSON text of the `meta` object as the token carries it; empty
    // when absent. Handed to the connected event and then dropped: a
    // session does not keep it.
    std::string meta;
};

struct verify_result {
    token_error error = token_error::none;
    // Spelled qualified because the member shares the type's name.
    auth::claims claims;
};

class jwt_verifier {
public:
    // `algorithm` is "HS256", "HS384", "HS512", "RS256" or "ES256". For HS*
    // `key` is the shared secret; otherwise a PEM public key ("BEGIN
    // PUBLIC KEY", or "BEGIN RSA PUBLIC KEY"; RSA for RS256, P-256 for
    // ES256). `audience` empty accepts any. Throws pushy::config_error
    // for an unknown algorithm, an empty key, an HS* secret that is a PEM
    // block (a public key used as an HMAC secret lets anyone sign) or a
    // public key that does not load or does not fit the algorithm.
    jwt_verifier(std::string algorithm, std::string key, std::string audience);

    // Verifies `token` at time `now` (seconds since the epoch). On error
    // the claims are left empty.
    verify_result verify(std::string_view token, std::int64_t now) const;

private:
    std::string algorithm_;
    std::string key_;
    std::string audience_;
    int alg_ = 0;  // jwt_alg_t of algorithm_
};

}  // namespace pushy::auth
