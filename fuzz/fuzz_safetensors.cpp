// Fuzzes the safetensors reader (include/devpipe/safetensors.h): the input is written as a file
// and opened; every tensor it lists is read through (every byte touched, so that ASan sees a
// view reaching past the mapping) and converted to float, and load_all reads it again.
// Anything but a devpipe::Error for a bad file is a finding.
#include <devpipe/safetensors.h>

#include <cstddef>
#include <cstdint>

#include "fuzz_util.h"

using namespace devpipe;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const auto path = fuzz::scratch_dir() / "input.safetensors";
  fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  fuzz::expect_only_devpipe_errors("safetensors::File", [&] {
    auto file = safetensors::File::open(path.string());
    std::uint8_t sum = 0;
    for (const auto& name : file.names()) {
      const auto& info = file.info(name);
      Tensor t = file.get(name);
      if (t.shape() != info.shape || t.dtype() != info.dtype || t.nbytes() != info.end - info.begin) {
        std::fprintf(stderr, "tensor '%s': the view disagrees with its header entry\n", name.c_str());
        std::abort();
      }
      const auto* bytes = static_cast<const std::uint8_t*>(t.raw_data());
      for (std::size_t i = 0; i < t.nbytes(); ++i) sum = static_cast<std::uint8_t>(sum + bytes[i]);
      if (t.numel() <= (1 << 16)) (void)t.to_float_vector();
    }
    for (const auto& [k, v] : file.metadata()) sum = static_cast<std::uint8_t>(sum + k.size() + v.size());
    (void)file.file_size();
    auto all = safetensors::load_all(path.string());
    if (all.size() != file.names().size()) {
      std::fprintf(stderr, "load_all read %zu tensors, File lists %zu\n", all.size(), file.names().size());
      std::abort();
    }
    volatile std::uint8_t keep = sum;
    (void)keep;
  });
  return 0;
}
