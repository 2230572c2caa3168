#include "detail/json_raw.hpp"

namespace pushy::json {

namespace od = simdjson::ondemand;

simdjson::error_code raw_text(od::value v, std::string_view& out) {
    od::json_type type;
    if (auto e = v.type().get(type)) return e;
    if (type == od::json_type::object) {
        od::object o;
        if (auto e = v.get_object().get(o)) return e;
        if (auto e = o.raw_json().get(out)) return e;
    } else if (type == od::json_type::array) {
        od::array a;
        if (auto e = v.get_array().get(a)) return e;
        if (auto e = a.raw_json().get(out)) return e;
    } else {
        out = v.raw_json_token();
    }
    while (!out.empty() && (out.back() == ' ' || out.back() == '\n' ||
                            out.back() == '\r' || out.back() == '\t')) {
        out.remove_suffix(1);
    }
    return simdjson::SUCCESS;
}

}  // namespace pushy::json
