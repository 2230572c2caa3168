#include "metrics/prometheus.hpp"

#include <prometheus/metric_family.h>
#include <prometheus/text_serializer.h>

#include <limits>
#include <map>
#include <vector>

namespace pushy::metrics {

namespace {

namespace pm = prometheus;
using simdjson::dom::element;
using simdjson::dom::object;

// Objects of counts whose keys are a label's values.
const std::map<std::string_view, std::string_view> labelled = {
    {"pushes", "outcome"},  {"rejects", "reason"},
    {"reconnects", "reason"}, {"status", "code"},
};

// Numbers that are a level, not a count.
bool is_gauge(const std::string& path) {
    return path == "connections" || path == "uptime_s" ||
           path == "upgrades_in_progress" ||
           path == "fleet_redis_up" || path.starts_with("drain_");
}

// "uptime_s" -> "uptime_seconds": Prometheus names carry the base unit.
std::string metric_name(std::string path) {
    if (path.ends_with("_s")) path.replace(path.size() - 2, 2, "_seconds");
    return "pushy_" + path;
}

class builder {
public:
    explicit builder(std::string node) : node_(std::move(node)) {}

    void walk(object obj, const std::string& prefix) {
        for (auto [key, value] : obj) {
            std::string path = prefix.empty()
                                   ? std::string(key)
                                   : prefix + "_" + std::string(key);
            if (auto it = labelled.find(key);
                it != labelled.end() && value.is_object()) {
                add_labelled(path, it->second, value.get_object());
            } else if (key == "latency_us" && value.is_object()) {
                add_histogram(path, value.get_object());
            } else if (value.is_object()) {
                walk(value.get_object(), path);
            } else if (value.is_number()) {
                add(path, double(value), {});
            } else if (value.is_bool()) {
                add(path, bool(value) ? 1 : 0, {});
            } else if (path == "fleet_redis" && value.is_string()) {
                add("fleet_redis_up",
                    std::string_view(value) == "up" ? 1 : 0, {});
            }
        }
    }

    std::vector<pm::MetricFamily> take() {
        std::vector<pm::MetricFamily> out;
        for (auto& name : order_) out.push_back(std::move(families_[name]));
        return out;
    }

private:
    pm::MetricFamily& family(const std::string& path, bool gauge,
                             bool histogram = false) {
        auto name = metric_name(path);
        if (!gauge && !histogram) name += "_total";
        auto [it, added] = families_.try_emplace(name);
        if (added) {
            order_.push_back(name);
            it->second.name = name;
            it->second.help = "pushy /v1/stats " + path;
            it->second.type = histogram ? pm::MetricType::Histogram
                              : gauge   ? pm::MetricType::Gauge
                                        : pm::MetricType::Counter;
        }
        return it->second;
    }

    void add(const std::string& path, double v,
             std::vector<pm::ClientMetric::Label> labels) {
        bool gauge = is_gauge(path);
        auto& f = family(path, gauge);
        pm::ClientMetric m;
        m.label.push_back({"node", node_});
        for (auto& l : labels) m.label.push_back(std::move(l));
        if (gauge) {
            m.gauge.value = v;
        } else {
            m.counter.value = v;
        }
        f.metric.push_back(std::move(m));
    }

    void add_labelled(const std::string& path, std::string_view label,
                      object counts) {
        for (auto [k, v] : counts) {
            if (!v.is_number()) continue;
            add(path, double(v), {{std::string(label), std::string(k)}});
        }
    }

    // {"count":N,"buckets":[[upper_us,count],...]} -> a histogram in
    // seconds (cumulative buckets, then +Inf).
    void add_histogram(const std::string& path, object h) {
        std::string name = path.substr(0, path.size() - 3);  // "_us"
        auto& f = family(name + "_seconds", false, true);
        pm::ClientMetric m;
        m.label.push_back({"node", node_});
        std::uint64_t seen = 0;
        simdjson::dom::array buckets;
        if (!h["buckets"].get_array().get(buckets)) {
            for (element b : buckets) {
                simdjson::dom::array pair;
                if (b.get_array().get(pair) || pair.size() < 2) continue;
                seen += std::uint64_t(double(pair.at(1)));
                pm::ClientMetric::Bucket bucket;
                bucket.upper_bound = double(pair.at(0)) / 1e6;
                bucket.cumulative_count = seen;
                m.histogram.bucket.push_back(bucket);
            }
        }
        std::uint64_t count = seen;
        std::uint64_t n;
        if (!h["count"].get_uint64().get(n)) count = n;
        pm::ClientMetric::Bucket inf;
        inf.upper_bound = std::numeric_limits<double>::infinity();
        inf.cumulative_count = count;
        m.histogram.bucket.push_back(inf);
        m.histogram.sample_count = count;
        f.metric.push_back(std::move(m));
    }

    std::string node_;
    std::map<std::string, pm::MetricFamily> families_;
    std::vector<std::string> order_;
};

}  // namespace

std::string prometheus_text(std::string_view stats_json,
                            simdjson::dom::parser& parser) {
    simdjson::padded_string padded(stats_json);
    object doc;
    if (parser.parse(padded).get_object().get(doc)) return {};
    std::string_view node;
    if (doc["node"].get_string().get(node)) node = {};
    builder b{std::string(node)};
    b.walk(doc, "");
    return pm::TextSerializer().Serialize(b.take());
}

}  // namespace pushy::metrics
