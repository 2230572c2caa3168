// Unit tests of the device-token verifier: one case per classification,
// the claims of accepted tokens, and the keys each algorithm takes.
#include "auth/jwt_verifier.hpp"

#include <doctest/doctest.h>
#include <jwt.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "pushy/config.hpp"

namespace {

using pushy::auth::jwt_verifier;
using pushy::auth::token_error;
using pushy::auth::verify_result;

// Key pairs generated with `openssl genpkey` for these tests only; they
// protect nothing.
const std::string rsa_private = R"(-----BEGIN PRIVATE KEY-----
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCwhXh8OA6OiLUw
p22NwZIFobXI4+k907AvY4jZ75w40QRuxUG1cZEjtv5lXYRFSsWv0HJV4cMGpOXp
vyCXR4+w9j3HFBrJhBzrnrTp3G5SLHnNLomkP9bq9GBGVJgKq1i6jab8GhXp3orG
oofmrw30TBikULki9yMp5VZYMZxR9R5LKq/Z1l1oPiajlrFAq7lL0PQeO19oe8z+
u3irr/6W1AnnQvdLlIMmjbDuoMuiicXX4cUBpD6Mp3DLy4IHFMNo3yu9XvGFtdou
rfk23e33bDlNiLk6ycEmGISQQGVOppEsZWtWPYtSOprdqAHaya02JKYCpchbPvJO
/pTumRg/AgMBAAECggEAGNkboMDIq8pqrF1Pz/M+Tt9N65LJiRPSFURO8KleCvwW
l6aEyA8jKIKLRPw+W6gEM+ovw2Ry7kMqv2tRdyTHrAK9p4HDqOJD/+w9+JLi+gZG
DwVMstDvEUaH1t6e7cGOTT8WER7K6Y+TZsAHnrK9pXSgyLXkRHEYLhRDwfPEgXS3
nQkDEqzoUQr4Nrqsd6XqNxWupxhCu/NISfVnZoGbVA2iqVrjVjUdEEmd4UeO+9zr
WpWDk5H+5X7+zXdCte2KNHXvpIlz2ROUy+uc4UIpGtFZnhnNl8A7S5fGEnERhebH
/k72MqoLgTwOb0lifVOyjsgMSk47s0W43sZ5Rc21wQKBgQDqIBJj3n2lqwgTzqyD
e2QkWB7f8m4ueMCpxDYyJ4Qg8HUSYPVqeKxDVLFRkkrDXuWN08xkqtRrr3KP2Oux
TSXe8Bb2utrWr1M1e1K+ao6k5EMlMtQGH8Zvkc51acoeRIysdyYaYSyKgEaRuUto
OiGhfUX03KzinLMV58/48qtziQKBgQDBA5lZKY8+/g3k57RUaGGwV0OpLwz288gx
GyKPVXyoscbvMNPzSEHh6bmkzXDZg0iOPRzdQa2tuwpboGHKN+jlFRB239qi2gbx
hondKj3BjickeS6MNn1xlrhYfvOrhZjltrgkjLiNEYfbsBO8VPf30lPIzLu37x/R
eXDpRLwThwKBgQCYk+ooN5k+3CVZczkuPr3Wia8lV0LC+mLkwEBpkyMirFI/dfy6
NIZfItSkSmh6xl9nfH4ZpNLmkuJgKIgBdjuV/HWauc9gVcYudn5IJf1sLG4t0eAn
VZHmp+kaz6Su8RGUW9nzGx0B7fMPiOhBtpCwQ4nRt/bbgC+duQLqRIvDsQKBgEm4
HS7f37VYhWgDU23VvFIE0nPg45vCuph+27FRHl60H94lkR5fX8JwaZZXXR3GtcSV
9NtRBYvQX4FlfVQmDI7Kf9JXZ4NBsNs43pkZVCMEL1EP88Zb3Yev4FL0kg7V5PL/
2c8j7Cz9IB25X6BT962wqI2OHLiA3W89afG+bfMrAoGBALOBHkX5t4uO27SERPi4
DH91N6wLc5w5Gxcc0wuVwmLS9fHy4LUpvSyDCrGS9CbeoCLoURHU5pPMYgejcvFj
7HxRWHHFvBNN8eS0ksi6wRdOsEilwDIFw5PElIef5rMX5c4IHehbcjSLn8eiHgQ8
Y1htlJGRk+2OkBfnM8+OYL11
-----END PRIVATE KEY-----
)";
const std::string rsa_public = R"(-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAsIV4fDgOjoi1MKdtjcGS
BaG1yOPpPdOwL2OI2e+cONEEbsVBtXGRI7b+ZV2ERUrFr9ByVeHDBqTl6b8gl0eP
sPY9xxQayYQc65606dxuUix5zS6JpD/W6vRgRlSYCqtYuo2m/BoV6d6KxqKH5q8N
9EwYpFC5IvcjKeVWWDGcUfUeSyqv2dZdaD4mo5axQKu5S9D0HjtfaHvM/rt4q6/+
ltQJ50L3S5SDJo2w7qDLoonF1+HFAaQ+jKdwy8uCBxTDaN8rvV7xhbXaLq35Nt3t
92w5TYi5OsnBJhiEkEBlTqaRLGVrVj2LUjqa3agB2smtNiSmAqXIWz7yTv6U7pkY
PwIDAQAB
-----END PUBLIC KEY-----
)";
const std::string rsa_pkcs1_public = R"(-----BEGIN RSA PUBLIC KEY-----
MIIBCgKCAQEAsIV4fDgOjoi1MKdtjcGSBaG1yOPpPdOwL2OI2e+cONEEbsVBtXGR
I7b+ZV2ERUrFr9ByVeHDBqTl6b8gl0ePsPY9xxQayYQc65606dxuUix5zS6JpD/W
6vRgRlSYCqtYuo2m/BoV6d6KxqKH5q8N9EwYpFC5IvcjKeVWWDGcUfUeSyqv2dZd
aD4mo5axQKu5S9D0HjtfaHvM/rt4q6/+ltQJ50L3S5SDJo2w7qDLoonF1+HFAaQ+
jKdwy8uCBxTDaN8rvV7xhbXaLq35Nt3t92w5TYi5OsnBJhiEkEBlTqaRLGVrVj2L
Ujqa3agB2smtNiSmAqXIWz7yTv6U7pkYPwIDAQAB
-----END RSA PUBLIC KEY-----
)";
const std::string ec_private = R"(-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgD/iLRxpRwOXziLY3
VlpV80BqC1JhlX6hwJYtkMlVmyahRANCAAS/lXN9bziuoX53pcEjW7S3094dE694
kTXeQ3QqtXy0kFxSyobJUAs9EL1aKydK1NoBxht0sMQTHMBXSiq0t+YO
-----END PRIVATE KEY-----
)";
const std::string ec_public = R"(-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEv5VzfW84rqF+d6XBI1u0t9PeHROv
eJE13kN0KrV8tJBcUsqGyVALPRC9WisnStTaAcYbdLDEExzAV0oqtLfmDg==
-----END PUBLIC KEY-----
)";
const std::string ec_p384_public = R"(-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEiKZdDquYMhBmRPv6oA0fbExEJ7L7Yt6F
WvmDhr6IrN4/WFY2wAp5BMecWtu9LMNPvXDvq9DW0ehYxGJu5doGInD4gh979jEL
oEk4pm1O9L97c9MBAd7Xg7W+ydbf8MBq
-----END PUBLIC KEY-----
)";

constexpr std::int64_t now = 1'700'000'000;
const std::string secret = "device-token-secret";

// Frees a libjwt object.
struct jwt_deleter {
    void operator()(jwt_t* j) const noexcept { jwt_free(j); }
};

// The claims of a token built with libjwt; unset members are left out.
// The with_* helpers return a copy with one member replaced.
struct claim_set {
    std::optional<std::string> sub = "tv-1";
    std::optional<std::string> acc = "acct-1";
    std::optional<long> exp = now + 3600;
    std::string more_json;  // further claims as a JSON object

    claim_set with_sub(std::optional<std::string> v) const {
        claim_set c = *this;
        c.sub = std::move(v);
        return c;
    }
    claim_set with_acc(std::optional<std::string> v) const {
        claim_set c = *this;
        c.acc = std::move(v);
        return c;
    }
    claim_set with_exp(std::optional<long> v) const {
        claim_set c = *this;
        c.exp = v;
        return c;
    }
    claim_set with_json(std::string v) const {
        claim_set c = *this;
        c.more_json = std::move(v);
        return c;
    }
};

// Encodes and signs a token with libjwt's encode API.
std::string make_token(const claim_set& claims, jwt_alg_t alg,
                       const std::string& key) {
    jwt_t* raw = nullptr;
    REQUIRE(jwt_new(&raw) == 0);
    std::unique_ptr<jwt_t, jwt_deleter> token(raw);
    if (claims.sub) {
        REQUIRE(jwt_add_grant(token.get(), "sub", claims.sub->c_str()) == 0);
    }
    if (claims.acc) {
        REQUIRE(jwt_add_grant(token.get(), "acc", claims.acc->c_str()) == 0);
    }
    if (claims.exp) {
        REQUIRE(jwt_add_grant_int(token.get(), "exp", *claims.exp) == 0);
    }
    if (!claims.more_json.empty()) {
        REQUIRE(jwt_add_grants_json(token.get(), claims.more_json.c_str()) ==
                0);
    }
    REQUIRE(jwt_set_alg(token.get(), alg,
                        reinterpret_cast<const unsigned char*>(key.data()),
                        static_cast<int>(key.size())) == 0);
    char* text = jwt_encode_str(token.get());
    REQUIRE(text != nullptr);
    std::string out(text);
    std::free(text);
    return out;
}

// The claims most tokens carry: a device, an account, exp in an hour.
const claim_set defaults{};

// Signs `claims` with HS256 and the test secret.
std::string hs256_token(const claim_set& claims = defaults) {
    return make_token(claims, JWT_ALG_HS256, secret);
}

// Encodes bytes as unpadded base64url.
std::string b64url(const std::string& in) {
    std::string out(4 * ((in.size() + 2) / 3) + 1, '\0');
    const int n = EVP_EncodeBlock(
        reinterpret_cast<unsigned char*>(out.data()),
        reinterpret_cast<const unsigned char*>(in.data()),
        static_cast<int>(in.size()));
    out.resize(static_cast<std::size_t>(n));
    while (!out.empty() && out.back() == '=') out.pop_back();
    for (auto& c : out) {
        if (c == '+') c = '-';
        if (c == '/') c = '_';
    }
    return out;
}

// Builds a token from raw header and payload JSON, signed with HMAC-SHA256
// under `key`, for shapes libjwt's encoder cannot produce.
std::string craft(const std::string& header, const std::string& payload,
                  const std::string& key = secret) {
    const std::string input = b64url(header) + "." + b64url(payload);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int mac_len = 0;
    REQUIRE(HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
                 reinterpret_cast<const unsigned char*>(input.data()),
                 input.size(), mac, &mac_len) != nullptr);
    return input + "." +
           b64url(std::string(reinterpret_cast<char*>(mac), mac_len));
}

// Replaces the payload segment of `token`, keeping its signature.
std::string swap_payload(const std::string& token,
                         const std::string& payload) {
    const auto first = token.find('.');
    const auto second = token.find('.', first + 1);
    return token.substr(0, first + 1) + b64url(payload) +
           token.substr(second);
}

// The HS256 verifier most cases use: no audience.
const jwt_verifier& hs_verifier() {
    static const jwt_verifier verifier("HS256", secret, "");
    return verifier;
}

// Verifies with the HS256 verifier at `now` and returns the error.
token_error hs_error(const std::string& token) {
    return hs_verifier().verify(token, now).error;
}

}  // namespace

TEST_CASE("an HS256 token naming a device is accepted with its claims") {
    const verify_result result = hs_verifier().verify(hs256_token(), now);
    CHECK(result.error == token_error::none);
    CHECK(result.claims.device == "tv-1");
    CHECK(result.claims.account == "acct-1");
    CHECK(result.claims.expires_at == now + 3600);
}

TEST_CASE("HS384 and HS512 tokens are accepted by their own verifiers") {
    const jwt_verifier hs384("HS384", secret, "");
    const jwt_verifier hs512("HS512", secret, "");
    CHECK(hs384.verify(make_token({}, JWT_ALG_HS384, secret), now).error ==
          token_error::none);
    CHECK(hs512.verify(make_token({}, JWT_ALG_HS512, secret), now).error ==
          token_error::none);
}

TEST_CASE("an empty token is missing") {
    CHECK(hs_error("") == token_error::missing);
}

TEST_CASE("a token that is not three base64url segments is malformed") {
    const std::string token = hs256_token();
    const auto last_dot = token.rfind('.');
    CHECK(hs_error("x") == token_error::malformed);
    CHECK(hs_error(token.substr(0, last_dot)) == token_error::malformed);
    CHECK(hs_error(token + ".e30") == token_error::malformed);
    CHECK(hs_error(token + "=") == token_error::malformed);
    CHECK(hs_error(" " + token) == token_error::malformed);
    CHECK(hs_error("Bearer " + token) == token_error::malformed);
    CHECK(hs_error("..") == token_error::malformed);

    // A segment of 1 mod 4 characters encodes no whole byte.
    CHECK(hs_error(token.substr(0, last_dot + 1) + "AAAAA") ==
          token_error::malformed);

    // Standard base64 characters are not base64url.
    std::string plus = token;
    plus[last_dot + 1] = '+';
    CHECK(hs_error(plus) == token_error::malformed);

    std::string with_nul = token;
    with_nul[last_dot + 1] = '\0';
    CHECK(hs_error(with_nul) == token_error::malformed);
}

TEST_CASE("a header or payload that is not a JSON object is malformed") {
    const std::string header = R"({"alg":"HS256","typ":"JWT"})";
    const std::string payload = R"({"sub":"tv-1"})";
    CHECK(hs_error(craft("[1]", payload)) == token_error::malformed);
    CHECK(hs_error(craft("\"HS256\"", payload)) == token_error::malformed);
    CHECK(hs_error(craft("", payload)) == token_error::malformed);
    CHECK(hs_error(craft("{alg:HS256}", payload)) == token_error::malformed);
    CHECK(hs_error(craft(header, "[1]")) == token_error::malformed);
    CHECK(hs_error(craft(header, "tv-1")) == token_error::malformed);
    CHECK(hs_error(craft(header, "")) == token_error::malformed);
    CHECK(hs_error(craft(header, "{\"sub\":\"a\xff\"}")) ==
          token_error::malformed);
    CHECK(hs_error(craft(header, payload + "x")) == token_error::malformed);
}

TEST_CASE("a header without a string alg is malformed") {
    const std::string payload = R"({"sub":"tv-1"})";
    CHECK(hs_error(craft(R"({"typ":"JWT"})", payload)) ==
          token_error::malformed);
    CHECK(hs_error(craft(R"({"alg":null})", payload)) ==
          token_error::malformed);
    CHECK(hs_error(craft(R"({"alg":["HS256"]})", payload)) ==
          token_error::malformed);
}

TEST_CASE("a header alg other than the configured one is the wrong "
          "algorithm") {
    const std::string payload = R"({"sub":"tv-1"})";
    SUBCASE("none, unsigned") {
        const std::string token =
            b64url(R"({"alg":"none"})") + "." + b64url(payload) + ".";
        CHECK(hs_error(token) == token_error::wrong_algorithm);
    }
    SUBCASE("none, built by libjwt") {
        jwt_t* raw = nullptr;
        REQUIRE(jwt_new(&raw) == 0);
        std::unique_ptr<jwt_t, jwt_deleter> jwt(raw);
        REQUIRE(jwt_add_grant(jwt.get(), "sub", "tv-1") == 0);
        char* text = jwt_encode_str(jwt.get());
        REQUIRE(text != nullptr);
        const std::string token(text);
        std::free(text);
        CHECK(hs_error(token) == token_error::wrong_algorithm);
    }
    SUBCASE("none, with an HMAC signature") {
        CHECK(hs_error(craft(R"({"alg":"none"})", payload)) ==
              token_error::wrong_algorithm);
    }
    SUBCASE("another HMAC size with the same secret") {
        CHECK(hs_error(make_token({}, JWT_ALG_HS512, secret)) ==
              token_error::wrong_algorithm);
    }
    SUBCASE("the right name in another case") {
        CHECK(hs_error(craft(R"({"alg":"hs256"})", payload)) ==
              token_error::wrong_algorithm);
    }
    SUBCASE("an RS256 token") {
        CHECK(hs_error(make_token({}, JWT_ALG_RS256, rsa_private)) ==
              token_error::wrong_algorithm);
    }
    SUBCASE("an unknown name") {
        CHECK(hs_error(craft(R"({"alg":"XX999"})", payload)) ==
              token_error::wrong_algorithm);
    }
}

TEST_CASE("the algorithm is judged before the signature") {
    const std::string token = make_token({}, JWT_ALG_HS512, "other secret");
    CHECK(hs_error(token) == token_error::wrong_algorithm);
    CHECK(hs_error(swap_payload(token, "{}")) == token_error::wrong_algorithm);
}

TEST_CASE("an HS256 token presented to an RS256 verifier is the wrong "
          "algorithm") {
    const jwt_verifier rs("RS256", rsa_public, "");
    CHECK(rs.verify(hs256_token(), now).error ==
          token_error::wrong_algorithm);

    // Keyed with the public PEM text: libjwt alone would accept this.
    const std::string forged =
        craft(R"({"alg":"HS256","typ":"JWT"})",
              R"({"sub":"tv-1","exp":1800000000})", rsa_public);
    CHECK(rs.verify(forged, now).error == token_error::wrong_algorithm);
}

TEST_CASE("a duplicated alg member is malformed, even spelled with an "
          "escape") {
    const jwt_verifier rs("RS256", rsa_public, "");
    const std::string payload = R"({"sub":"tv-1"})";

    // libjwt keeps the last member, so it would verify these as HS256
    // keyed with the public PEM text.
    CHECK(rs.verify(craft(R"({"alg":"RS256","alg":"HS256"})", payload,
                          rsa_public),
                    now)
              .error == token_error::malformed);
    CHECK(rs.verify(craft(R"({"alg":"RS256","\u0061lg":"HS256"})", payload,
                          rsa_public),
                    now)
              .error == token_error::malformed);
    CHECK(hs_error(craft(R"({"alg":"HS256","alg":"HS256"})", payload)) ==
          token_error::malformed);
}

TEST_CASE("a signature that does not verify is a bad signature") {
    const std::string token = hs256_token();
    CHECK(hs_error(make_token({}, JWT_ALG_HS256, "another secret")) ==
          token_error::bad_signature);
    CHECK(hs_error(swap_payload(token, R"({"sub":"tv-2"})")) ==
          token_error::bad_signature);
    CHECK(hs_error(token.substr(0, token.rfind('.') + 1)) ==
          token_error::bad_signature);
    CHECK(hs_error(token.substr(0, token.rfind('.') + 1) + "AAAA") ==
          token_error::bad_signature);
}

TEST_CASE("a typ other than JWT is malformed, as libjwt 1.10 refuses it") {
    const std::string payload = R"({"sub":"tv-1","exp":4102444800})";
    CHECK(hs_error(craft(R"({"alg":"HS256","typ":"at+jwt"})", payload)) ==
          token_error::malformed);
    CHECK(hs_error(craft(R"({"alg":"HS256","typ":"jwt"})", payload)) ==
          token_error::none);
    CHECK(hs_error(craft(R"({"alg":"HS256"})", payload)) ==
          token_error::none);
}

TEST_CASE("JSON libjwt refuses is malformed rather than a bad signature") {
    const std::string header = R"({"alg":"HS256"})";
    CHECK(hs_error(craft(header, R"({"sub":"tv\u0000-1"})")) ==
          token_error::malformed);
    CHECK(hs_error(craft(header,
                         R"({"sub":"tv-1","exp":18446744073709551615})")) ==
          token_error::malformed);
}

TEST_CASE("exp at or before now is expired") {
    const auto error = [](long exp) {
        return hs_error(hs256_token(defaults.with_exp(exp)));
    };
    CHECK(error(now) == token_error::expired);
    CHECK(error(now - 1) == token_error::expired);
    CHECK(error(0) == token_error::expired);
    CHECK(error(-1) == token_error::expired);
    const std::string token = hs256_token(defaults.with_exp(now + 1));
    const verify_result later = hs_verifier().verify(token, now);
    CHECK(later.error == token_error::none);
    CHECK(later.claims.expires_at == now + 1);
}

TEST_CASE("a token without exp is refused") {
    const std::string token = hs256_token(defaults.with_exp(std::nullopt));
    const verify_result result = hs_verifier().verify(token, now);
    CHECK(result.error == token_error::no_expiry);
    CHECK(describe(result.error) == "token has no exp (expiry)");
}

TEST_CASE("a fractional exp expires at the next whole second") {
    const auto token = [](const char* exp) {
        return hs256_token(defaults.with_exp(std::nullopt).with_json(
            std::string("{\"exp\":") + exp + "}"));
    };
    const verify_result result =
        hs_verifier().verify(token("1700000000.5"), now);
    CHECK(result.error == token_error::none);
    CHECK(result.claims.expires_at == now + 1);
    CHECK(hs_error(token("1699999999.5")) == token_error::expired);
    CHECK(hs_verifier().verify(token("1e30"), now).claims.expires_at ==
          std::numeric_limits<std::int64_t>::max());
}

TEST_CASE("an exp that is not a number is malformed") {
    const auto token = [](const char* exp) {
        return hs256_token(defaults.with_exp(std::nullopt).with_json(
            std::string("{\"exp\":") + exp + "}"));
    };
    CHECK(hs_error(token("\"1800000000\"")) == token_error::malformed);
    CHECK(hs_error(token("null")) == token_error::malformed);
    CHECK(hs_error(token("true")) == token_error::malformed);
}

TEST_CASE("a token without a usable sub has no device") {
    const claim_set no_sub = defaults.with_sub(std::nullopt);
    CHECK(hs_error(hs256_token(no_sub)) == token_error::no_device);
    CHECK(hs_error(hs256_token(defaults.with_sub(""))) ==
          token_error::no_device);
    CHECK(hs_error(hs256_token(no_sub.with_json(R"({"sub":42})"))) ==
          token_error::no_device);
    CHECK(hs_error(hs256_token(no_sub.with_json(R"({"sub":null})"))) ==
          token_error::no_device);
    CHECK(hs_error(hs256_token(no_sub.with_json(R"({"sub":["tv-1"]})"))) ==
          token_error::no_device);
}

TEST_CASE("a device id longer than 256 bytes is refused, 256 accepted") {
    CHECK(hs_error(hs256_token(defaults.with_sub(std::string(257, 'd')))) ==
          token_error::long_device);
    CHECK(hs_error(hs256_token(defaults.with_sub(std::string(256, 'd')))) ==
          token_error::none);
}

TEST_CASE("acc is optional and must be a string") {
    const claim_set no_acc = defaults.with_acc(std::nullopt);
    const verify_result result = hs_verifier().verify(hs256_token(no_acc), now);
    CHECK(result.error == token_error::none);
    CHECK(result.claims.device == "tv-1");
    CHECK(result.claims.account.empty());
    CHECK(hs_error(hs256_token(no_acc.with_json(R"({"acc":7})"))) ==
          token_error::malformed);
}

TEST_CASE("a claim given twice is malformed") {
    const std::string header = R"({"alg":"HS256"})";
    CHECK(hs_error(craft(header, R"({"sub":"tv-1","sub":"tv-2"})")) ==
          token_error::malformed);
    CHECK(hs_error(craft(header, R"({"sub":"tv-1","\u0073ub":"tv-2"})")) ==
          token_error::malformed);
    CHECK(hs_error(craft(header, R"({"sub":"tv-1","exp":1,"exp":2})")) ==
          token_error::malformed);

    // Claims the verifier does not read may repeat.
    CHECK(hs_error(craft(
              header, R"({"sub":"tv-1","exp":4102444800,"x":1,"x":2})")) ==
          token_error::none);
}

TEST_CASE("meta is optional and its JSON text is kept as the token has it") {
    CHECK(hs_verifier().verify(hs256_token(), now).claims.meta.empty());
    // Spacing, escapes and member order survive: the text is not re-encoded.
    const std::string meta = R"({ "name" : "Salon \u00e9", "n":[1, 2.50]})";
    // Crafted: libjwt's encoder would re-encode the claims.
    const verify_result result = hs_verifier().verify(
        craft(R"({"alg":"HS256"})",
              R"({"sub":"tv-1","exp":4102444800,"meta":)" + meta + "}"),
        now);
    CHECK(result.error == token_error::none);
    CHECK(result.claims.meta == meta);
    CHECK(result.claims.device == "tv-1");
}

TEST_CASE("meta must be a JSON object of at most 1024 bytes") {
    const auto error = [](const std::string& meta_json) {
        return hs_error(hs256_token(
            defaults.with_json(R"({"meta":)" + meta_json + "}")));
    };
    CHECK(error("{}") == token_error::none);
    CHECK(error("[]") == token_error::bad_meta);
    CHECK(error(R"("text")") == token_error::bad_meta);
    CHECK(error("1") == token_error::bad_meta);
    CHECK(error("null") == token_error::bad_meta);

    // {"k":"xxx..."} of exactly 1024 bytes, then one more.
    const std::string head = R"({"k":")";
    const std::string at_limit =
        head + std::string(1024 - head.size() - 2, 'x') + "\"}";
    REQUIRE(at_limit.size() == 1024);
    CHECK(error(at_limit) == token_error::none);
    const std::string over =
        head + std::string(1024 - head.size() - 1, 'x') + "\"}";
    CHECK(error(over) == token_error::bad_meta);

    CHECK(pushy::auth::describe(token_error::bad_meta) ==
          "token meta must be a JSON object of at most 1024 bytes");
    CHECK(pushy::auth::metric_name(token_error::bad_meta) ==
          "token_bad_meta");
}

TEST_CASE("meta given twice is malformed, even spelled with an escape") {
    const std::string header = R"({"alg":"HS256"})";
    CHECK(hs_error(craft(header, R"({"sub":"tv-1","exp":4102444800,)"
                                 R"("meta":{},"meta":{}})")) ==
          token_error::malformed);
    CHECK(hs_error(craft(header, R"({"sub":"tv-1","exp":4102444800,)"
                                 R"("meta":{},"\u006deta":{}})")) ==
          token_error::malformed);
    // One escaped name is still the meta claim.
    const verify_result result = hs_verifier().verify(
        craft(header,
              R"({"sub":"tv-1","exp":4102444800,"\u006deta":{"a":1}})"),
        now);
    CHECK(result.error == token_error::none);
    CHECK(result.claims.meta == R"({"a":1})");
}

TEST_CASE("meta is judged after every other claim") {
    const claim_set bad_meta = defaults.with_json(R"({"meta":[1]})");
    CHECK(hs_error(hs256_token(bad_meta.with_exp(now))) ==
          token_error::expired);
    CHECK(hs_error(hs256_token(bad_meta.with_sub(std::nullopt))) ==
          token_error::no_device);
    CHECK(hs_error(hs256_token(bad_meta)) == token_error::bad_meta);
}

TEST_CASE("a configured audience must be in aud") {
    const jwt_verifier verifier("HS256", secret, "pushy");
    const auto error = [&](const char* aud_json) {
        claim_set claims;
        if (aud_json) {
            claims.more_json = std::string("{\"aud\":") + aud_json + "}";
        }
        return verifier.verify(hs256_token(claims), now).error;
    };
    CHECK(error(R"("pushy")") == token_error::none);
    CHECK(error(R"(["other","pushy"])") == token_error::none);
    CHECK(error(R"([1,"pushy"])") == token_error::none);
    CHECK(error(nullptr) == token_error::bad_audience);
    CHECK(error(R"("other")") == token_error::bad_audience);
    CHECK(error(R"("Pushy")") == token_error::bad_audience);
    CHECK(error(R"(["other"])") == token_error::bad_audience);
    CHECK(error(R"([])") == token_error::bad_audience);
    CHECK(error(R"([["pushy"]])") == token_error::bad_audience);
    CHECK(error(R"({"aud":"pushy"})") == token_error::bad_audience);
    CHECK(error("null") == token_error::bad_audience);
}

TEST_CASE("without a configured audience any aud is accepted") {
    CHECK(hs_error(hs256_token(defaults.with_json(R"({"aud":"other"})"))) ==
          token_error::none);
    CHECK(hs_error(hs256_token(defaults.with_json(R"({"aud":[1,2]})"))) ==
          token_error::none);
}

TEST_CASE("claim checks run in the documented order") {
    const jwt_verifier verifier("HS256", secret, "pushy");
    const claim_set all_wrong = defaults.with_sub(std::nullopt).with_exp(now);
    CHECK(verifier.verify(hs256_token(all_wrong), now).error ==
          token_error::expired);
    const std::string no_sub = hs256_token(defaults.with_sub(std::nullopt));
    CHECK(verifier.verify(no_sub, now).error == token_error::no_device);

    // Claims are judged only once the signature holds.
    const std::string forged =
        make_token(all_wrong, JWT_ALG_HS256, "another secret");
    CHECK(verifier.verify(forged, now).error == token_error::bad_signature);
}

TEST_CASE("a rejected token leaves the claims empty") {
    const verify_result result =
        hs_verifier().verify(hs256_token(defaults.with_exp(now)), now);
    CHECK(result.error == token_error::expired);
    CHECK(result.claims.device.empty());
    CHECK(result.claims.account.empty());
    CHECK(result.claims.expires_at == 0);
}

TEST_CASE("RS256 tokens verify with the PEM public key") {
    const jwt_verifier rs("RS256", rsa_public, "");
    const std::string token = make_token({}, JWT_ALG_RS256, rsa_private);
    const verify_result result = rs.verify(token, now);
    CHECK(result.error == token_error::none);
    CHECK(result.claims.device == "tv-1");
    CHECK(result.claims.account == "acct-1");
    CHECK(rs.verify(swap_payload(token, R"({"sub":"tv-2"})"), now).error ==
          token_error::bad_signature);
    CHECK(rs.verify(make_token({}, JWT_ALG_ES256, ec_private), now).error ==
          token_error::wrong_algorithm);
}

TEST_CASE("ES256 tokens verify with a P-256 public key") {
    const jwt_verifier es("ES256", ec_public, "");
    const std::string token = make_token({}, JWT_ALG_ES256, ec_private);
    const verify_result result = es.verify(token, now);
    CHECK(result.error == token_error::none);
    CHECK(result.claims.device == "tv-1");
    CHECK(es.verify(swap_payload(token, R"({"sub":"tv-2"})"), now).error ==
          token_error::bad_signature);
    CHECK(es.verify(make_token({}, JWT_ALG_RS256, rsa_private), now).error ==
          token_error::wrong_algorithm);
}

TEST_CASE("verifying leaves no OpenSSL error queued on the thread") {
    ERR_clear_error();
    const jwt_verifier rs("RS256", rsa_public, "");
    const std::string token = make_token({}, JWT_ALG_RS256, rsa_private);
    CHECK(rs.verify(swap_payload(token, "{}"), now).error ==
          token_error::bad_signature);
    CHECK(rs.verify(token.substr(0, token.rfind('.') + 1) + "AAAA", now)
              .error == token_error::bad_signature);
    CHECK(ERR_peek_error() == 0);
}

TEST_CASE("the constructor refuses configurations that cannot verify") {
    using pushy::config_error;
    CHECK_THROWS_AS(jwt_verifier("HS1", secret, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("none", secret, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("", secret, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("hs256", secret, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("RS384", rsa_public, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("HS256", "", ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("RS256", "", ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("HS256", rsa_public, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("RS256", "not a key", ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("RS256", rsa_private, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("RS256", ec_public, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("ES256", rsa_public, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("ES256", ec_p384_public, ""), config_error);
    CHECK_THROWS_AS(jwt_verifier("ES256", ec_private, ""), config_error);
    CHECK_NOTHROW(jwt_verifier("RS256", rsa_public, "pushy"));
    CHECK_NOTHROW(jwt_verifier("ES256", ec_public, ""));

    // libjwt also reads a PKCS#1 "RSA PUBLIC KEY" block.
    CHECK_NOTHROW(jwt_verifier("RS256", rsa_pkcs1_public, ""));
    CHECK(ERR_peek_error() == 0);
}

TEST_CASE("describe and metric_name name every error") {
    using pushy::auth::describe;
    using pushy::auth::metric_name;
    CHECK(describe(token_error::missing) == "missing token");
    CHECK(describe(token_error::malformed) == "malformed token");
    CHECK(describe(token_error::bad_signature) == "bad signature");
    CHECK(describe(token_error::wrong_algorithm) == "wrong algorithm");
    CHECK(describe(token_error::expired) == "token expired");
    CHECK(describe(token_error::no_device) ==
          "token has no sub (device id)");
    CHECK(describe(token_error::bad_audience) == "wrong audience");
    CHECK(metric_name(token_error::missing) == "token_missing");
    CHECK(metric_name(token_error::malformed) == "token_malformed");
    CHECK(metric_name(token_error::bad_signature) == "token_bad_signature");
    CHECK(metric_name(token_error::wrong_algorithm) ==
          "token_wrong_algorithm");
    CHECK(metric_name(token_error::expired) == "token_expired");
    CHECK(metric_name(token_error::no_device) == "token_no_device");
    CHECK(metric_name(token_error::bad_audience) == "token_bad_audience");
}

TEST_CASE("verify may run on several threads at once") {
    const jwt_verifier hs("HS256", secret, "");
    const jwt_verifier rs("RS256", rsa_public, "");
    const std::string hs_good = hs256_token();
    const std::string hs_bad = swap_payload(hs_good, R"({"sub":"x"})");
    const std::string rs_good = make_token({}, JWT_ALG_RS256, rsa_private);
    const std::string rs_bad = swap_payload(rs_good, R"({"sub":"x"})");

    constexpr int threads = 4;
    constexpr int rounds = 50;
    std::vector<int> failures(threads, 0);
    std::vector<std::thread> workers;
    for (int t = 0; t < threads; ++t) {
        workers.emplace_back([&, t] {
            for (int i = 0; i < rounds; ++i) {
                const bool ok =
                    hs.verify(hs_good, now).claims.device == "tv-1" &&
                    hs.verify(hs_bad, now).error ==
                        token_error::bad_signature &&
                    rs.verify(rs_good, now).claims.device == "tv-1" &&
                    rs.verify(rs_bad, now).error == token_error::bad_signature;
                if (!ok) ++failures[static_cast<std::size_t>(t)];
            }
        });
    }
    for (auto& worker : workers) worker.join();
    for (int f : failures) CHECK(f == 0);
}
