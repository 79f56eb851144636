"""The modules of bench/run.py (and the machine info shared by every bench script). The bench
scripts use the installed cpsl (``pip install .``), or the one on ``PYTHONPATH``."""
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BATCHES = (1, 32)
# Targets (bench.md reports PASS/MISS for each)
TARGET_SPEEDUP = 5.0            # student int8 ORT b1 vs teacher fp32 eager PyTorch b1, same CPU
TARGET_RETENTION = 0.97         # int8 Non0_acc_2 / teacher Non0_acc_2
TARGET_MAE_INCREASE = 0.05      # int8 MAE / teacher MAE - 1
TARGET_INT8_BYTES = 1_000_000   # 1 MB (decimal) on disk
TEACHER_EPOCHS = {"quick": 8, "full": 30}
STUDENT_EPOCHS = {"quick": 12, "full": 40}
ITERS = {"quick": 100, "full": 400}
SKIPPABLE = ("cp_kernel", "train_step", "profiles", "runner", "tensorrt")
