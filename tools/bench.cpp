// devpipe bench — placeholder until the benchmark workloads land (issue 4).
#include <iostream>

#include "cli_common.h"

namespace devpipe::cli {

int bench_main(const Args&) {
  std::cerr << "devpipe bench: the benchmark workloads are not built yet\n";
  return 2;
}

}  // namespace devpipe::cli
