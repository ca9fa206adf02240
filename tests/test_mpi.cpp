// Ranks as processes (devpipe/world.h): the same program (tests/mpi_worker.cpp) run as threads
// of one process and as `mpirun -np N` processes gives the same results, and a peer process
// that hangs or dies makes the others fail within the collective timeout instead of hanging.
//
// Tolerance: results must be equal to rel 1e-6 (the bound). They are in fact equal bit
// for bit: the MPI all-reduce sums every element over the ranks in rank order in float32, as the
// thread mode's shared-memory communicator does, and each rank runs the same kernels on the
// same shards.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>

#include "devpipe/devpipe.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;
namespace fs = std::filesystem;

namespace {

struct Proc {
  int code = -1;
  double seconds = 0;
};

Proc run(const std::string& cmd) {
  const auto t0 = std::chrono::steady_clock::now();
  int status = std::system(cmd.c_str());
  Proc r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  r.code =
      WIFEXITED(status) ? WEXITSTATUS(status) : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
  return r;
}

std::string worker(const std::string& scenario, const std::string& work, const std::string& out,
                   int tp) {
  return std::string(DEVPIPE_MPI_WORKER) + " " + scenario + " " + work + " " + out + " " +
         std::to_string(tp);
}

std::string mpirun(int np, const std::string& extra = "") {
  return std::string(DEVPIPE_MPIEXEC) + " --allow-run-as-root --oversubscribe --bind-to none " +
         extra + " -np " + std::to_string(np) + " ";
}

// A macro, not a function: GTEST_SKIP returns from the test only when it stands in the test body.
#if DEVPIPE_TEST_MPI
#define DEVPIPE_SKIP_WITHOUT_MPI() (void)0
#else
#define DEVPIPE_SKIP_WITHOUT_MPI() \
  GTEST_SKIP() << "devpipe was built without MPI (install libopenmpi-dev: scripts/install_deps.sh)"
#endif

nlohmann::json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) return nullptr;
  return nlohmann::json::parse(in);
}

// (scenario, tp_degree, processes): tp / processes ranks per process.
class ProcessesEqualThreads : public ::testing::TestWithParam<std::tuple<std::string, int, int>> {
 protected:
  // A failure here must not wait out the default 300 s.
  void SetUp() override { setenv("DEVPIPE_COLLECTIVE_TIMEOUT_S", "60", 1); }
};

/// Runs `scenario` at `tp` in thread mode, then as `np` processes under `mpirun` with
/// `launcher_flags`, and expects every process's outputs equal to thread mode's (rel 1e-6; token
/// ids exactly).
void expect_processes_equal_threads(const std::string& scenario, int tp, int np, const std::string& launcher_flags) {
  TempDir dir;
  // Thread mode: one process runs every rank.
  Proc t = run("DEVPIPE_WORLD=threads " +
               worker(scenario, dir.str("threads"), dir.str("threads/out"), tp) + " > " +
               dir.str("threads.log") + " 2>&1");
  ASSERT_EQ(t.code, 0) << "thread mode failed; log " << dir.str("threads.log");
  auto expected = safetensors::load_all(dir.str("threads/out.p0.safetensors"));
  // Process mode: tp / np ranks per process.
  Proc p = run(mpirun(np, launcher_flags) + worker(scenario, dir.str("mpi"), dir.str("mpi/out"), tp) + " > " +
               dir.str("mpi.log") + " 2>&1");
  std::ifstream log(dir.str("mpi.log"));
  std::string log_text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  ASSERT_EQ(p.code, 0) << "mpirun -np " << np << " " << launcher_flags << " failed:\n" << log_text;
  for (int proc = 0; proc < np; ++proc) {
    const std::string path = dir.str("mpi/out.p" + std::to_string(proc) + ".safetensors");
    ASSERT_TRUE(fs::exists(path)) << "process " << proc << " wrote no output; log:\n" << log_text;
    auto got = safetensors::load_all(path);
    ASSERT_EQ(got.size(), expected.size());
    for (const auto& [name, want] : expected) {
      ASSERT_TRUE(got.count(name)) << name;
      if (want.dtype() == DType::Int64) {
        const Tensor& g = got.at(name);
        ASSERT_EQ(g.shape(), want.shape()) << name;
        std::vector<std::int64_t> a(g.data<std::int64_t>(), g.data<std::int64_t>() + g.numel());
        std::vector<std::int64_t> b(want.data<std::int64_t>(),
                                    want.data<std::int64_t>() + want.numel());
        EXPECT_EQ(a, b) << scenario << " " << name << " process " << proc;
      } else {
        EXPECT_TRUE(tensors_close(got.at(name), want, 1e-6, 0))
            << scenario << " " << name << " process " << proc;
      }
    }
  }
}

TEST_P(ProcessesEqualThreads, OnEveryProcess) {
  DEVPIPE_SKIP_WITHOUT_MPI();
  const auto& [scenario, tp, np_param] = GetParam();
  expect_processes_equal_threads(scenario, tp, np_param == 0 ? tp : np_param, "");
}

// What a run across machines changes, short of a second machine: the processes are placed by a
// hostfile and talk over TCP sockets only (Open MPI's ob1 messaging over the tcp transport, on
// the loopback interface), not over shared memory, as processes on two machines would.
TEST(MpiTransport, AHostfileAndTcpOnlyGiveThreadModesResults) {
  DEVPIPE_SKIP_WITHOUT_MPI();
  setenv("DEVPIPE_COLLECTIVE_TIMEOUT_S", "60", 1);
  TempDir hosts;
  {
    std::ofstream f(hosts.str("hosts"));
    f << "localhost slots=2\n";
  }
  const std::string flags = "--hostfile " + hosts.str("hosts") +
                            " --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include lo";
  for (const char* scenario : {"seed", "llama"}) {
    SCOPED_TRACE(scenario);
    expect_processes_equal_threads(scenario, 2, 2, flags);
  }
}

std::string param_name(const ::testing::TestParamInfo<std::tuple<std::string, int, int>>& info) {
  return std::get<0>(info.param) + "_tp" + std::to_string(std::get<1>(info.param)) + "_np" +
         std::to_string(std::get<2>(info.param));
}

// One rank per process at tp 2 and 4.
INSTANTIATE_TEST_SUITE_P(Mpi, ProcessesEqualThreads,
                         ::testing::Combine(::testing::Values("seed", "mlp", "bcast", "llama", "llava", "dit"), ::testing::Values(2, 4),
                                            ::testing::Values(0)),
                         [](const auto& info) { return param_name(info); });
// Two ranks per process: tp 4 over 2 processes (threads inside, MPI between; the seed's two
// local ranks may run each other's conv bands while they wait in the local barriers).
INSTANTIATE_TEST_SUITE_P(MpiGroups, ProcessesEqualThreads,
                         ::testing::Combine(::testing::Values("seed", "mlp", "bcast", "llama", "llava", "dit"), ::testing::Values(4),
                                            ::testing::Values(2)),
                         [](const auto& info) { return param_name(info); });

// Two rank groups at once: stages at tp 4 and 8 over 2 processes (2 and 4 ranks per process,
// both groups' leaders in MPI collectives), forwarded concurrently from two threads; each group
// must talk on its own communicator (on a shared one their collectives pair up across groups).
INSTANTIATE_TEST_SUITE_P(MpiTwoGroups, ProcessesEqualThreads,
                         ::testing::Combine(::testing::Values("two"), ::testing::Values(4), ::testing::Values(2)),
                         [](const auto& info) { return param_name(info); });

constexpr double kTimeout = 3;

/// A peer that stops (hang) or dies (kill) before its forward: process 0 raises a
/// CollectiveError within the timeout (plus a margin for the polling and a loaded machine),
/// and the whole job ends (the failing process aborts it) instead of hanging.
void expect_survivor_fails_in_time(const std::string& scenario, const std::string& launcher_flags) {
  TempDir dir;
  Proc p = run("DEVPIPE_COLLECTIVE_TIMEOUT_S=" + std::to_string(kTimeout) + " timeout 120 " +
               mpirun(2, launcher_flags) + worker(scenario, dir.str("w"), dir.str("out"), 2) +
               " > " + dir.str("log") + " 2>&1");
  std::ifstream log(dir.str("log"));
  std::string log_text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
  EXPECT_NE(p.code, 0) << log_text;
  EXPECT_NE(p.code, 124) << "the job hung until `timeout` ended it:\n" << log_text;
  EXPECT_LT(p.seconds, 60) << log_text;
  nlohmann::json r = read_json(dir.str("out.p0.json"));
  ASSERT_FALSE(r.is_null()) << "process 0 recorded no error:\n" << log_text;
  const std::string msg = r.at("error").get<std::string>();
  EXPECT_NE(msg.find("did not complete within 3 s"), std::string::npos) << msg;
  EXPECT_NE(msg.find("all_reduce"), std::string::npos) << msg;
  EXPECT_GE(r.at("seconds").get<double>(), kTimeout - 0.1) << msg;
  EXPECT_LT(r.at("seconds").get<double>(), kTimeout + 5) << msg;
}

TEST(MpiFaults, AHungPeerFailsTheOthersWithinTheTimeout) {
  DEVPIPE_SKIP_WITHOUT_MPI();
  expect_survivor_fails_in_time("hang", "");
}

TEST(MpiFaults, AKilledPeerFailsTheOthersWithinTheTimeout) {
  DEVPIPE_SKIP_WITHOUT_MPI();
  // By default mpirun ends the whole job when a process dies; with abort_on_non_zero_status off
  // it lets the survivors run, and they must then fail on their own, in time.
  expect_survivor_fails_in_time("kill", "--mca orte_abort_on_non_zero_status 0");
}

TEST(MpiFaults, AKilledPeerEndsTheJobUnderTheDefaultLauncher) {
  DEVPIPE_SKIP_WITHOUT_MPI();
  TempDir dir;
  Proc p = run("DEVPIPE_COLLECTIVE_TIMEOUT_S=100 timeout 120 " + mpirun(2) +
               worker("kill", dir.str("w"), dir.str("out"), 2) + " > " + dir.str("log") + " 2>&1");
  EXPECT_NE(p.code, 0);
  EXPECT_NE(p.code, 124) << "the job hung";
  EXPECT_LT(p.seconds, 60);
}

TEST(MpiFaults, ProcessesWithDifferentConfigsAreRefusedNamingBoth) {
  DEVPIPE_SKIP_WITHOUT_MPI();
  TempDir dir;
  Proc p = run(mpirun(2) + worker("mismatch", dir.str("w"), dir.str("out"), 2) + " > " +
               dir.str("log") + " 2>&1");
  EXPECT_NE(p.code, 0);
  nlohmann::json r0 = read_json(dir.str("out.p0.json")), r1 = read_json(dir.str("out.p1.json"));
  ASSERT_FALSE(r0.is_null());
  ASSERT_FALSE(r1.is_null());
  EXPECT_NE(r0.at("error").get<std::string>().find(
                "process 1 has batch_size 8, this process (0 of 2) has batch_size 4"),
            std::string::npos)
      << r0.dump();
  EXPECT_NE(r1.at("error").get<std::string>().find(
                "process 0 has batch_size 4, this process (1 of 2) has batch_size 8"),
            std::string::npos)
      << r1.dump();
}

}  // namespace
