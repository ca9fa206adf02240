// The process mode of the benchmark (tools/mpi_bench.cpp): `mpirun -np 2 devpipe_mpi_bench` on
// tiny sizes writes a report with the machine, both modes of every workload with their outputs
// compared bit for bit, the collectives each forward runs, and devpipe's collectives against
// MPI's; an output that differs in one ulp fails the run. Skipped when devpipe is built
// without MPI. (No timing is asserted: the numbers are the bench's, not a test's.)
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>

#include "test_util.h"

using devpipe::testing::TempDir;
using nlohmann::json;

namespace {

#if DEVPIPE_TEST_MPI
int run(const std::string& cmd) {
  const int status = std::system(cmd.c_str());
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

std::string bench(const TempDir& dir, const std::string& extra) {
  return std::string(DEVPIPE_MPIEXEC) + " --allow-run-as-root --oversubscribe --bind-to none -np 2 " +
         DEVPIPE_MPI_BENCH + " --out " + dir.str("report.json") + " --work " + dir.str("work") +
         " --workloads chain8,mlp --iters 4 --rounds 2 --sizes 256,4096 --calls 10 " + extra + " > " +
         dir.str("log") + " 2>&1";
}
#endif

TEST(MpiBench, ReportsBothModesTheirCollectivesAndTheFloor) {
#if !DEVPIPE_TEST_MPI
  GTEST_SKIP() << "devpipe was built without MPI (install libopenmpi-dev: scripts/install_deps.sh)";
#else
  setenv("DEVPIPE_COLLECTIVE_TIMEOUT_S", "60", 1);
  TempDir dir;
  ASSERT_EQ(run(bench(dir, "")), 0) << slurp(dir.str("log"));
  const json r = json::parse(slurp(dir.str("report.json")));
  EXPECT_FALSE(r.at("machine").at("cpu").get<std::string>().empty());
  EXPECT_GE(r.at("machine").at("cores").get<int>(), 1);
  // The commit, or "unknown ..." where git is missing (a fresh root without git).
  const std::string commit = r.at("run").at("commit").get<std::string>();
  EXPECT_TRUE(commit.size() == 40 || commit.rfind("unknown", 0) == 0) << r["run"].dump();
  EXPECT_EQ(r.at("run").at("load_average_start").size(), 3u);
  EXPECT_TRUE(r.at("outputs_match").get<bool>());
  for (const char* w : {"chain8", "mlp"}) {
    const json& wj = r.at("workloads").at(w);
    EXPECT_TRUE(wj.at("output_check").at("process0_bit_equal").get<bool>()) << w;
    EXPECT_TRUE(wj.at("output_check").at("process1_bit_equal").get<bool>()) << w;
    for (const char* mode : {"threads", "processes"}) {
      const json& lat = wj.at(mode).at("latency_ms");
      EXPECT_EQ(lat.at("samples").get<int>(), 4) << w << " " << mode;
      EXPECT_GT(lat.at("p50").get<double>(), 0) << w << " " << mode;
    }
    EXPECT_NEAR(wj.at("ratio_p50_processes_over_threads").get<double>(),
                wj["processes"]["latency_ms"]["p50"].get<double>() / wj["threads"]["latency_ms"]["p50"].get<double>(),
                1e-9);
  }
  // chain8's stages have no collectives (plain Linear, replicated at tp 2); the MLP has one
  // all-reduce of its [32, 512] float32 activations per block (4) and one all-gather of the
  // head's [32, 512] output, in both modes.
  EXPECT_TRUE(r["workloads"]["chain8"]["processes"]["collectives"].empty());
  for (const char* mode : {"threads", "processes"}) {
    const json& c = r["workloads"]["mlp"][mode]["collectives"];
    EXPECT_EQ(c.at("all_reduce").at("calls_per_forward").get<double>(), 4) << mode;
    EXPECT_EQ(c.at("all_gather").at("calls_per_forward").get<double>(), 1) << mode;
  }
  const json& pc = r["workloads"]["mlp"]["processes"]["collectives"];
  EXPECT_EQ(pc["all_reduce"]["bytes"], json::parse(R"([{"bytes": 65536, "calls_per_forward": 4.0}])"));
  EXPECT_EQ(pc["all_gather"]["bytes"], json::parse(R"([{"bytes": 65536, "calls_per_forward": 1.0}])"));
  // The collectives: the workload's sizes and the sweep, both ops, every result equal to MPI's.
  std::set<std::string> seen;
  for (const json& c : r.at("collectives")) {
    seen.insert(c.at("op").get<std::string>() + " " + std::to_string(c.at("bytes").get<std::size_t>()) + " " +
                c.at("source").get<std::string>());
    EXPECT_TRUE(c.at("results_equal").get<bool>()) << c.dump();
    EXPECT_GT(c.at("floor").at("p50_us").get<double>(), 0);
    EXPECT_NEAR(c.at("ratio_p50").get<double>(),
                c["devpipe"]["p50_us"].get<double>() / c["floor"]["p50_us"].get<double>(), 1e-9);
    EXPECT_NEAR(c.at("ratio_min").get<double>(),
                c["devpipe"]["min_us"].get<double>() / c["floor"]["min_us"].get<double>(), 1e-9);
    EXPECT_EQ(c.at("within_1_2x").get<bool>(), c["ratio_p50"].get<double>() <= 1.2);
  }
  EXPECT_EQ(seen, (std::set<std::string>{"all_reduce 65536 workload", "all_gather 65536 workload",
                                         "all_reduce 256 sweep", "all_reduce 4096 sweep", "all_gather 256 sweep",
                                         "all_gather 4096 sweep"}));
#endif
}

TEST(MpiBench, AnOutputOneUlpOffFailsTheRun) {
#if !DEVPIPE_TEST_MPI
  GTEST_SKIP() << "devpipe was built without MPI";
#else
  setenv("DEVPIPE_COLLECTIVE_TIMEOUT_S", "60", 1);
  TempDir dir;
  EXPECT_EQ(run(bench(dir, "--perturb-threads-output")), 1) << slurp(dir.str("log"));
  const json r = json::parse(slurp(dir.str("report.json")));
  EXPECT_FALSE(r.at("outputs_match").get<bool>());
  for (const char* w : {"chain8", "mlp"}) {
    EXPECT_FALSE(r["workloads"][w]["output_check"]["ok"].get<bool>()) << w;
    EXPECT_GT(r["workloads"][w]["output_check"]["max_abs_diff"].get<double>(), 0) << w;
  }
  EXPECT_NE(slurp(dir.str("log")).find("mlp: process 0's output differs from thread mode's"), std::string::npos);
#endif
}

TEST(MpiBench, RefusesToRunOutsideTheLauncher) {
#if !DEVPIPE_TEST_MPI
  GTEST_SKIP() << "devpipe was built without MPI";
#else
  TempDir dir;
  EXPECT_NE(run(std::string(DEVPIPE_MPI_BENCH) + " --out " + dir.str("r.json") + " > " + dir.str("log") + " 2>&1"), 0);
  EXPECT_NE(slurp(dir.str("log")).find("runs as 2 MPI processes: mpirun -np 2"), std::string::npos)
      << slurp(dir.str("log"));
#endif
}

}  // namespace
