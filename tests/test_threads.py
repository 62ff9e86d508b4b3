"""The thread policy of training: OpenMP waits passively unless the user says otherwise, and
torch gets one thread per usable CPU then, else one thread."""

import os
import subprocess
import sys

import pytest

PROBE = ("import os, torch; from imgcls.system import available_cpus, configure_threads, passive_openmp;"
         " default = torch.get_num_threads();"
         " print(os.environ.get('OMP_WAIT_POLICY'), passive_openmp(), configure_threads(torch.device('cpu')),"
         " torch.get_num_threads(), min(default, available_cpus()))")


def probe(first: str, env_changes: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", f"{first}; {PROBE}"], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return out.stdout.split()


@pytest.mark.parametrize("first, env, policy, passive", [
    ("import imgcls", {}, "PASSIVE", "True"),                          # the command line's order
    ("import torch; import imgcls", {}, "PASSIVE", "False"),           # too late for torch's OpenMP
    ("import imgcls", {"OMP_WAIT_POLICY": "active"}, "active", "False"),  # the user's choice stays
])
def test_openmp_policy_and_threads(first, env, policy, passive):
    got_policy, got_passive, returned, threads, usable = probe(first, env)
    assert (got_policy, got_passive) == (policy, passive)
    assert returned == threads == (usable if passive == "True" else "1")
