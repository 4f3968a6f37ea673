"""The demo behind `python train.py` with no --model / --data: SmolLM2-135M-Instruct fine-tuned
with ReSURE on the synthetic noisy benchmark's tier N (support/synth.py), then scored on clean test
dialogues (train.demo_report)."""
import os

from support.smollm2 import cache_root, prepare_smollm2
from support.synth import synth


def prepare(seed):
    """(model folder, training file, clean test file) of the demo, made on first use."""
    model = prepare_smollm2()
    data_dir = os.path.join(cache_root(), f"synth-seed{seed}")
    if not os.path.isfile(os.path.join(data_dir, "synth_meta.json")):  # written last: complete
        synth(data_dir, seed=seed)
    train = os.path.join(data_dir, "train_N.jsonl")
    test = os.path.join(data_dir, "test.jsonl")
    return model, train, test
