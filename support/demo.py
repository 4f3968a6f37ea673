"""The demo behind `python train.py` with no --model / --data: SmolLM2-135M-Instruct fine-tuned
with ReSURE on the synthetic noisy benchmark's tier N (support/synth.py), then scored on clean test
dialogues (train.demo_report). Imported on first use: its model comes from a GGUF (gguf)."""
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


def resolve_model(args, settings, log):
    """The demo fills --model and --data with its own and returns its clean test file, logging
    its settings (the keys of `settings`); --data alone trains the demo's model."""
    if args.demo:
        args.model, args.data, test = prepare(args.seed)
        log("demo: SmolLM2-135M-Instruct + LoRA + ReSURE on the synthetic noisy multi-turn "
            "benchmark (tier N)")
        log("demo settings: " + " ".join(f"{k}={getattr(args, k)}" for k in settings))
        return test
    args.model = prepare_smollm2()
    return None
