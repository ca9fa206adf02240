// The world's runtime objects: the one rank-to-device mapping (World::device_of_rank), the
// placement of ranks in processes with their devices, and the world's registry of rank groups
// (runtime/rank_group.h): one group per (device kind, tp_degree), sharing its streams and
// communicator between stages, made with the backend's device collectives on the devices the
// mapping gives, and freed (its threads stopped) with its last user.
#include <gtest/gtest.h>

#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "devpipe/error.h"
#include "devpipe/world.h"
#include "pipeline_util.h"
#include "runtime/backend.h"
#include "runtime/rank_group.h"
#include "test_util.h"

using namespace devpipe;
using namespace devpipe::testing;

/// Expects `stmt` to throw `Type` with a message containing `part`.
#define EXPECT_THROW_MSG(stmt, Type, part)                              \
  do {                                                                  \
    try {                                                               \
      stmt;                                                             \
      ADD_FAILURE() << #stmt " did not throw";                          \
    } catch (const Type& e) {                                           \
      EXPECT_HAS(std::string(e.what()), part);                          \
    }                                                                   \
  } while (0)

namespace {

std::vector<int> indices(const std::vector<Device>& devices) {
  std::vector<int> out;
  for (const Device& d : devices) out.push_back(d.index);
  return out;
}

/// Threads of this process now (/proc/self/status).
int thread_count() {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("Threads:", 0) == 0) return std::stoi(line.substr(8));
  }
  ADD_FAILURE() << "/proc/self/status has no Threads: line";
  return -1;
}

/// thread_count() once it equals `want`, or after 5 s: a joined thread's task can still be
/// listed for a moment after join() returns (the kernel finishes its exit after waking the
/// joiner), which a loaded machine stretches.
int thread_count_settled(int want) {
  int n = thread_count();
  for (int i = 0; i < 500 && n != want; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    n = thread_count();
  }
  return n;
}

/// A backend with `devices` devices that only makes collectives and rank resources, recording
/// what it was told.
class FakeBackend final : public Backend {
 public:
  struct Made final : DeviceCollectives {
    explicit Made(int* alive) : alive_(alive) { ++*alive_; }
    ~Made() override { --*alive_; }
    int* alive_;
  };
  struct Resources final : RankResources {
    Resources(int* alive, int rank, Device device) : alive_(alive), rank(rank), device(device) {
      ++*alive_;
    }
    ~Resources() override { --*alive_; }
    int* alive_;
    int rank;
    Device device;
  };

  explicit FakeBackend(int devices) : devices_(devices) {}
  DeviceKind kind() const override { return DeviceKind::Cuda; }
  int device_count() const override { return devices_; }
  std::unique_ptr<DeviceCollectives> make_collectives(const GroupPlacement& p) override {
    placements.push_back(p);
    return std::make_unique<Made>(&alive);
  }
  std::shared_ptr<RankResources> make_rank_resources(int rank, Device device) override {
    return std::make_shared<Resources>(&resources_alive, rank, device);
  }
  std::unique_ptr<Executable> compile(const Graph&, const std::vector<Tensor>&, const RankInfo&) override {
    throw Unsupported("FakeBackend compiles nothing");
  }
  Tensor allocate(const Shape&, DType, Device) override { throw Unsupported("FakeBackend allocates nothing"); }
  void copy(void*, Device, const void*, Device, std::size_t) override {
    throw Unsupported("FakeBackend copies nothing");
  }

  std::vector<GroupPlacement> placements;
  int alive = 0;            // collectives made and not yet freed
  int resources_alive = 0;  // rank resources made and not yet freed

 private:
  int devices_;
};

World threads_world() { return World(Transport::Threads, 1, 0, 300); }

}  // namespace

TEST(World, DeviceOfRankWrapsRanksAroundTheDevices) {
  // tp 4 on 2 devices: ranks share them in turn; tp 2 on 4: the first two; tp 3 on 1: all on 0.
  std::vector<int> got;
  for (int r = 0; r < 4; ++r) got.push_back(World::device_of_rank(DeviceKind::Cuda, r, 4, 2).index);
  EXPECT_EQ(got, (std::vector<int>{0, 1, 0, 1}));
  EXPECT_EQ(World::device_of_rank(DeviceKind::Cuda, 1, 2, 4), Device::cuda(1));
  EXPECT_EQ(World::device_of_rank(DeviceKind::Cuda, 5, 8, 3), Device::cuda(2));
  EXPECT_EQ(World::device_of_rank(DeviceKind::Cpu, 2, 3, 1), Device::cpu(0));
  EXPECT_THROW_MSG(World::device_of_rank(DeviceKind::Cuda, 2, 2, 1), InvalidArgument,
                   "rank 2 of tp_degree 2 on cuda is out of range");
  EXPECT_THROW_MSG(World::device_of_rank(DeviceKind::Cuda, -1, 2, 1), InvalidArgument,
                   "rank -1 of tp_degree 2 on cuda is out of range");
  EXPECT_THROW_MSG(World::device_of_rank(DeviceKind::Cuda, 0, 1, 0), InvalidArgument,
                   "rank 0 of tp_degree 1 needs a cuda device, but this process sees 0");
}

TEST(World, LocalDevicesFollowTheRanksEachProcessRuns) {
  struct Case {
    Transport transport;
    int processes, process, tp, devices;
    std::vector<int> ranks, device_indices;
  };
  const std::vector<Case> cases = {
      {Transport::Threads, 1, 0, 4, 2, {0, 1, 2, 3}, {0, 1, 0, 1}},
      {Transport::Threads, 1, 0, 2, 8, {0, 1}, {0, 1}},
      {Transport::Mpi, 2, 1, 4, 4, {2, 3}, {2, 3}},  // two ranks per process, every GPU seen
      {Transport::Mpi, 2, 1, 4, 1, {2, 3}, {0, 0}},  // one GPU visible to each process
      {Transport::Mpi, 4, 3, 4, 4, {3}, {3}},        // one rank per process
      {Transport::Mpi, 4, 3, 4, 2, {3}, {1}},
      {Transport::Mpi, 2, 1, 1, 4, {0}, {0}},        // tp 1: replicated, rank 0 everywhere
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(transport_name(c.transport)) + " process " + std::to_string(c.process) + " of " +
                 std::to_string(c.processes) + ", tp " + std::to_string(c.tp) + ", " + std::to_string(c.devices) +
                 " devices");
    World w(c.transport, c.processes, c.process, 300, 1);
    EXPECT_EQ(w.local_ranks(c.tp), c.ranks);
    const std::vector<Device> devs = w.local_devices(DeviceKind::Cuda, c.tp, c.devices);
    EXPECT_EQ(indices(devs), c.device_indices);
    for (const Device& d : devs) EXPECT_EQ(d.kind, DeviceKind::Cuda);
  }
  EXPECT_THROW_MSG(World(Transport::Mpi, 4, 0, 300, 1).local_devices(DeviceKind::Cuda, 6, 4), ConfigError,
                   "tp_degree 6 under 4 MPI processes");
}

TEST(World, BackendsMapRanksThroughTheWorld) {
  FakeBackend three(3);
  EXPECT_EQ(three.device_for_rank(4, 5), Device::cuda(1));
  EXPECT_EQ(three.device_for_rank(2, 5), Device::cuda(2));
  EXPECT_THROW_MSG(three.device_for_rank(5, 5), InvalidArgument, "rank 5 of tp_degree 5 on cuda is out of range");
  EXPECT_EQ(backend_for(DeviceKind::Cpu).device_count(), 1);
  EXPECT_EQ(backend_for(DeviceKind::Cpu).device_for_rank(3, 4), Device::cpu(0));
}

TEST(World, GroupsPlaceTheirStreamsAndCollectivesOnTheMappedDevices) {
  World world = threads_world();
  FakeBackend be(3);
  auto group = world.rank_groups().get(world, be, 5);
  EXPECT_EQ(group->size(), 5);
  EXPECT_EQ(group->ranks(), (std::vector<int>{0, 1, 2, 3, 4}));
  EXPECT_EQ(indices(group->devices()), (std::vector<int>{0, 1, 2, 0, 1}));
  // The backend made the group's collectives for the same ranks on the same devices.
  ASSERT_EQ(be.placements.size(), 1u);
  const GroupPlacement& p = be.placements[0];
  EXPECT_EQ(p.world, &world);
  EXPECT_EQ(p.tp_degree, 5);
  EXPECT_EQ(p.ranks, group->ranks());
  EXPECT_EQ(p.devices, group->devices());
  EXPECT_EQ(group->comm().size(), 5);
  // Every rank's executables are compiled with the group's communicator and collectives.
  for (int r : group->ranks()) {
    const RankInfo info = group->rank_info(r, 3);
    EXPECT_EQ(info.rank, r);
    EXPECT_EQ(info.tp_degree, 5);
    EXPECT_EQ(info.comm, &group->comm());
    EXPECT_EQ(info.collectives, group->collectives());
    EXPECT_NE(info.collectives, nullptr);
    EXPECT_EQ(info.num_threads, 3);
    EXPECT_EQ(be.device_for_rank(r, 5), group->devices()[static_cast<std::size_t>(r)]);
  }
  // The cpu backend needs no device collectives: its kernels use the host communicator.
  auto cpu = world.rank_groups().get(world, backend_for(DeviceKind::Cpu), 2);
  EXPECT_EQ(cpu->collectives(), nullptr);
  EXPECT_EQ(cpu->devices(), (std::vector<Device>{Device::cpu(0), Device::cpu(0)}));
}

TEST(World, StagesOfOneDegreeShareAGroupAndOtherDegreesGetTheirOwn) {
  World world = threads_world();
  FakeBackend be(2);
  auto a = world.rank_groups().get(world, be, 2);
  auto b = world.rank_groups().get(world, be, 2);
  auto c = world.rank_groups().get(world, be, 4);
  EXPECT_EQ(a.get(), b.get());
  EXPECT_EQ(&a->comm(), &b->comm());
  EXPECT_EQ(a->collectives(), b->collectives());
  EXPECT_NE(a.get(), c.get());
  EXPECT_NE(&a->comm(), &c->comm());
  EXPECT_NE(a->collectives(), c->collectives());
  EXPECT_EQ(a->comm().size(), 2);
  EXPECT_EQ(c->comm().size(), 4);
  EXPECT_EQ(be.placements.size(), 2u);  // one set of collectives per degree, not per stage
  EXPECT_EQ(world.rank_groups().live(), 2u);
  // A copy of the world shares its registry; another world has its own.
  World copy = world;
  EXPECT_EQ(copy.rank_groups().get(copy, be, 2).get(), a.get());
  World other = threads_world();
  EXPECT_NE(other.rank_groups().get(other, be, 2).get(), a.get());
  EXPECT_THROW_MSG(world.rank_groups().get(other, be, 2), StateError, "owns another registry");
  // One group per (kind, tp): another backend of the same kind cannot take it over.
  FakeBackend second(2);
  EXPECT_THROW_MSG(world.rank_groups().get(world, second, 2), StateError,
                   "the cuda group of tp_degree 2 belongs to another backend");
}

TEST(World, TheRegistryFreesAGroupWithItsLastUser) {
  World world = threads_world();
  FakeBackend be(1);
  const int before = thread_count();
  auto a = world.rank_groups().get(world, be, 3);
  EXPECT_EQ(thread_count(), before + 3);  // a stream thread per rank
  std::weak_ptr<RankGroup> seen = a;
  auto b = world.rank_groups().get(world, be, 3);
  a.reset();
  EXPECT_FALSE(seen.expired());  // b still uses it
  EXPECT_EQ(be.alive, 1);
  EXPECT_EQ(world.rank_groups().live(), 1u);
  b.reset();
  EXPECT_TRUE(seen.expired());
  EXPECT_EQ(be.alive, 0);  // its collectives are gone with it
  EXPECT_EQ(world.rank_groups().live(), 0u);
  EXPECT_EQ(thread_count_settled(before), before);  // and its stream threads stopped
  // The next user gets a new group with new collectives.
  auto c = world.rank_groups().get(world, be, 3);
  EXPECT_EQ(be.placements.size(), 2u);
  EXPECT_EQ(be.alive, 1);
}

// A group makes each of its ranks' resources once, on the rank's device, when it first hands out
// the rank's RankInfo, and gives every later caller (any thread count) the same object; other
// ranks and other groups get their own. An executable holding a RankInfo keeps them after the
// group is gone; the last holder frees them.
TEST(World, GroupsOwnTheirRanksResources) {
  World world = threads_world();
  FakeBackend be(2);
  auto group = world.rank_groups().get(world, be, 3);
  EXPECT_EQ(be.resources_alive, 0);  // none before a rank is compiled for
  std::vector<std::shared_ptr<RankResources>> made;
  for (int r : group->ranks()) {
    const RankInfo info = group->rank_info(r, 2);
    auto* res = dynamic_cast<FakeBackend::Resources*>(info.resources.get());
    ASSERT_NE(res, nullptr);
    EXPECT_EQ(res->rank, r);
    EXPECT_EQ(res->device, group->devices()[static_cast<std::size_t>(r)]);
    EXPECT_EQ(group->rank_info(r, 2).resources, info.resources);
    EXPECT_EQ(group->rank_info(r, 5).resources, info.resources);
    for (const auto& m : made) EXPECT_NE(m, info.resources);
    made.push_back(info.resources);
  }
  EXPECT_EQ(be.resources_alive, 3);
  EXPECT_THROW_MSG(group->rank_info(3, 2), InvalidArgument,
                   "rank 3 of tp_degree 3 is not one this process runs");
  auto other = world.rank_groups().get(world, be, 2);
  EXPECT_NE(other->rank_info(0, 2).resources, made[0]);
  EXPECT_EQ(be.resources_alive, 4);
  other.reset();
  EXPECT_EQ(be.resources_alive, 3);  // freed with the group that held them alone
  // Rank 1's executable outlives the group: its resources stay, the others go with the group.
  const std::weak_ptr<RankResources> rank1 = made[1];
  {
    const RankInfo executable = group->rank_info(1, 2);
    made.clear();
    group.reset();
    EXPECT_EQ(be.resources_alive, 1);
    EXPECT_FALSE(rank1.expired());
    EXPECT_EQ(executable.resources, rank1.lock());
  }
  EXPECT_EQ(be.resources_alive, 0);
  EXPECT_TRUE(rank1.expired());
}

TEST(World, LoadedStagesShareTheProcessWorldsGroups) {
  TempDir dir;
  safetensors::save(dir.str("mlp.safetensors"), nn::random_state_dict(ParallelMlp(), 5));
  auto load = [&](int tp, const std::string& tag) {
    RuntimeConfig rc{.tp_degree = tp};
    rc.batch_size = 2;
    auto w = std::make_unique<TestWrapper<ParallelMlp>>(
        InferenceConfig(rc), WrapperOptions{.tag = tag}, std::vector<std::vector<Tensor>>{{Tensor::zeros({2, 16})}});
    w->compile(dir.str("mlp.safetensors"), dir.str(tag));
    w->load(dir.str(tag));
    return w;
  };
  RankGroups& groups = World::get().rank_groups();
  ASSERT_EQ(groups.live(), 0u);
  auto first = load(2, "first");
  EXPECT_EQ(groups.live(), 1u);
  auto second = load(2, "second");
  EXPECT_EQ(groups.live(), 1u);  // the second tp-2 stage joined the first one's group
  auto third = load(4, "third");
  EXPECT_EQ(groups.live(), 2u);
  {
    auto g2 = RankGroup::get(DeviceKind::Cpu, 2);
    EXPECT_EQ(g2->comm().size(), 2);
    EXPECT_EQ(RankGroup::get(DeviceKind::Cpu, 4)->comm().size(), 4);
    EXPECT_EQ(groups.live(), 2u);  // the lookups found the stages' groups
  }
  first.reset();
  EXPECT_EQ(groups.live(), 2u);
  second.reset();
  EXPECT_EQ(groups.live(), 1u);
  third.reset();
  EXPECT_EQ(groups.live(), 0u);
}
