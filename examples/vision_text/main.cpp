// The seed's step 4: compile, load and run the vision-text pipeline, then confirm the work.
//
//   vision_text_demo [--work DIR] [--vision-ckpt PATH] [--text-ckpt PATH] [--tp N] [--batch N]
//
// Without checkpoints it writes random ones (fixed seed) under DIR.
#include <chrono>
#include <iostream>
#include <string>

#include "models.h"

using namespace vision_text;

namespace {

int run(int argc, char** argv) {
  std::string work = "build/demo";
  std::string vision_ckpt, text_ckpt;
  int tp = 2;
  std::int64_t batch = 32;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw devpipe::InvalidArgument("missing value after " + a);
      return argv[++i];
    };
    if (a == "--work") work = next();
    else if (a == "--vision-ckpt") vision_ckpt = next();
    else if (a == "--text-ckpt") text_ckpt = next();
    else if (a == "--tp") tp = std::stoi(next());
    else if (a == "--batch") batch = std::stoll(next());
    else throw devpipe::InvalidArgument("unknown argument '" + a + "' (see the comment at the top of main.cpp)");
  }

  // Configure models
  InferenceConfig config = seed_config(batch, tp);

  if (vision_ckpt.empty() || text_ckpt.empty()) {
    std::cout << "Writing random checkpoints (seed 1234) under " << work << "\n";
    if (vision_ckpt.empty()) {
      vision_ckpt = write_random_checkpoint(VisionModel(config), work + "/checkpoints/vision", 1234);
    }
    if (text_ckpt.empty()) {
      text_ckpt = write_random_checkpoint(TextModel(config), work + "/checkpoints/text", 1235);
    }
  }

  // Create applications
  VisionModelApp vision_app(vision_ckpt, config);
  TextModelApp text_app(text_ckpt, config);
  vision_app.set_progress(devpipe::print_progress);
  text_app.set_progress(devpipe::print_progress);

  // Compile models
  std::cout << "Compiling (batch " << batch << ", float32, tp_degree " << tp << ")\n";
  vision_app.compile(work + "/compiled/vision");
  text_app.compile(work + "/compiled/text");

  // Load models
  std::cout << "Loading\n";
  vision_app.load(work + "/compiled/vision");
  text_app.load(work + "/compiled/text");

  // Example inference
  Tensor image_input = Tensor::randn({batch, 3, 224, 224}, 42);
  Tensor text_input = Tensor::randn({batch, 256}, 43);

  devpipe::reset_transfer_stats();
  auto t0 = std::chrono::steady_clock::now();
  // Forward pass through vision model: ranked output (list of lists), stays on the device
  devpipe::Output vision_features = vision_app.forward(image_input);
  // Forward pass through text model: host tensor, since return_ranked_to_cpu=true
  devpipe::Output final_output = text_app.forward(vision_features, text_input);
  auto ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  auto st = devpipe::transfer_stats();

  std::cout << "Final output shape: " << final_output.shape() << "\n";  // [32, 1024]

  // Confirm your work
  std::cout << "\n# Confirm your work\n";
  std::cout << "Vision features type: " << vision_features.type_name() << "\n";
  std::cout << "Final output shape: " << final_output.shape() << "\n";
  std::cout << "Final output device: " << final_output.device().kind_name() << "\n";
  std::cout << "\nPipeline forward took " << ms << " ms. Bytes copied host->device "
            << st.host_to_device_bytes << " (host inputs read in place: " << st.host_inputs_in_place
            << "), device->host " << st.device_to_host_bytes << ", between stages "
            << st.device_to_device_bytes << "; ranked inputs used in place " << st.ranked_inputs_in_place
            << ", re-padded " << st.ranked_inputs_copied << "\n";
  std::cout << final_output.tensor().to_string(4) << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const devpipe::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
