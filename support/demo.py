"""The demo behind `python train.py` with no --model / --data: SmolLM2-135M-Instruct fine-tuned
with ReSURE on the synthetic noisy benchmark's tier N (support/synth.py), then scored on clean test dialogues
(train.demo_report)."""
import os


def prepare(args, settings, log):
    """Fill args.model / args.data with the demo's model folder and training file; returns the test file."""
    from support.smollm2 import cache_root, prepare_smollm2
    from support.synth import synth
    args.model = prepare_smollm2()
    data_dir = os.path.join(cache_root(), f"synth-seed{args.seed}")
    if not os.path.isfile(os.path.join(data_dir, "synth_meta.json")):  # written last: the set is complete
        synth(data_dir, seed=args.seed)
    args.data = os.path.join(data_dir, "train_N.jsonl")
    log("demo: SmolLM2-135M-Instruct + LoRA + ReSURE on the synthetic noisy multi-turn benchmark (tier N)")
    log("demo settings: " + " ".join(f"{k}={getattr(args, k)}" for k in settings))
    return os.path.join(data_dir, "test.jsonl")
