// Fuzzes InferenceConfig::from_json (config.json of a work folder). Anything but a
// devpipe::Error for bad text is a finding, and so is a config that is accepted but does not
// say what the text says: every runtime field and attribute read must equal the JSON value
// (batch_size 4.9 read as 4, or tp_degree 2^32+2 read as 2, is silent corruption), and the
// config must survive the round trip from_json(to_json(c)) == c.
#include <devpipe/config.h>

#include <nlohmann/json.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"

using namespace devpipe;
using nlohmann::json;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_only_devpipe_errors("InferenceConfig::from_json", [&] {
    InferenceConfig c = InferenceConfig::from_json(text);
    (void)c.runtime_config().batch_buckets();
    const std::string again = c.to_json();
    const json in = json::parse(text), out = json::parse(again);
    const json& r = in.at("runtime");
    auto same = [&](const char* field, const json& read) {
      if (!(r.at(field) == read)) {
        std::fprintf(stderr, "from_json accepted runtime.%s = %s but read %s\n", field, r.at(field).dump().c_str(),
                     read.dump().c_str());
        std::abort();
      }
    };
    same("batch_size", c.runtime_config().batch_size);
    same("tp_degree", c.runtime_config().tp_degree);
    same("dtype", out.at("runtime").at("dtype"));
    if (r.contains("buckets")) same("buckets", c.runtime_config().buckets);
    if (r.contains("device")) same("device", out.at("runtime").at("device"));
    if (!(in.at("attributes") == out.at("attributes"))) {
      std::fprintf(stderr, "from_json accepted attributes %s but read %s\n", in.at("attributes").dump().c_str(),
                   out.at("attributes").dump().c_str());
      std::abort();
    }
    InferenceConfig back = InferenceConfig::from_json(again);
    if (!(back == c)) {
      std::fprintf(stderr, "round trip changed the config:\n%s\nread back as\n%s\n", again.c_str(),
                   back.to_json().c_str());
      std::abort();
    }
  });
  return 0;
}
