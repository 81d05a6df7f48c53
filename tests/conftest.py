import torch

# The CI box has 2 cores: training inside the pytest process stays on one, so trainer subprocesses
# get the other (two intra-op threads on a loaded machine spin-wait each other).
torch.set_num_threads(1)

# Longest first. pytest-xdist hands tests to its two workers in collection order, so a 100-s test collected
# late can end up running alone while the other worker idles. The slowest tests in `make test`'s
# "slowest 20" list start first; the short ones fill in at the end.
LONGEST_FIRST = (
    "test_planted_effect.py::",
    "test_cluster_no_shared_fs.py::test_the_default_study",
    "test_early_stop.py::test_a_planted_worse_arm",
    "test_local_ablation.py::test_ctrl_c",
    "test_local_ablation.py::test_kill_9",
    "test_vast_cheaper.py::test_an_outbid_arm_waits",
    "test_vast_backend.py::test_preempted_attempt_resumes",
    "test_adaptive_seeds.py::test_an_open_arm",
    "test_ssh_backend.py::test_ablation_on_two_hosts",
    "test_local_ablation.py::test_one_upstream_tokenizer",
    "test_local_ray_down.py::test_a_dead_local_ray",
    "test_zoo_arms.py::",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, part in enumerate(LONGEST_FIRST) if part in item.nodeid), len(LONGEST_FIRST))
    items.sort(key=rank)        # stable: the rest keep their order
