import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


@pytest.mark.timeout(180)
def test_ddp_two_processes_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
    env.pop("WORLD_SIZE", None)
    # 2 ranks x 2 micro-batches of 2 vs one process with the whole batch of 8: the same global batch
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(WORKER), str(tmp_path / "ddp.json"), "2"], env=env, capture_output=True, text=True,
                         timeout=170)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "one.json")], env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = json.loads((tmp_path / "ddp.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert a["world"] == 2 and b["world"] == 1
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=1e-6)
    assert a["param_sum"] == pytest.approx(b["param_sum"], rel=1e-5)
    assert a["losses"][-1] < a["losses"][0]
