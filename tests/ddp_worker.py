"""Run under isbi_unet.launch by test_ddp.py: trains through TrainUnetDataSet.main, then every
rank dumps its replica's weights so the test can compare them."""

import os
import sys

import numpy as np
import oneflow as flow

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from TrainUnetDataSet import main  # noqa: E402

out_dir, argv = sys.argv[1], sys.argv[2:]
model = main(argv)
state = {k: v.numpy() for k, v in model.state_dict().items()}
np.savez(os.path.join(out_dir, f"rank{flow.env.get_rank()}.npz"), **state)
