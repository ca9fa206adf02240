// Fuzzes InferenceConfig::from_json (config.json of a work folder). A config that parses must
// survive the round trip: from_json(to_json(c)) == c. Anything but a devpipe::Error for bad
// text is a finding.
#include <devpipe/config.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "fuzz_util.h"

using namespace devpipe;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  fuzz::expect_only_devpipe_errors("InferenceConfig::from_json", [&] {
    InferenceConfig c = InferenceConfig::from_json(text);
    (void)c.runtime_config().batch_buckets();
    const std::string again = c.to_json();
    InferenceConfig back = InferenceConfig::from_json(again);
    if (!(back == c)) {
      std::fprintf(stderr, "round trip changed the config:\n%s\nread back as\n%s\n", again.c_str(),
                   back.to_json().c_str());
      std::abort();
    }
  });
  return 0;
}
