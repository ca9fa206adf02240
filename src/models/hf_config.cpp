#include "models/hf_config.h"

#include <filesystem>
#include <fstream>

namespace devpipe::models {

nlohmann::json read_json_object(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw IoError("cannot open '" + path + "'");
  try {
    nlohmann::json j = nlohmann::json::parse(f);
    if (!j.is_object()) throw ConfigError("'" + path + "' holds " + std::string(j.type_name()) + ", expected a JSON object");
    return j;
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError("'" + path + "' is not valid JSON: " + e.what());
  }
}

nlohmann::json read_hf_config_json(const std::string& dir) {
  const std::string path = (std::filesystem::path(dir) / "config.json").string();
  if (!std::filesystem::exists(path)) {
    throw IoError("cannot open '" + path + "': a Hugging Face model folder needs a config.json");
  }
  return read_json_object(path);
}

}  // namespace devpipe::models
