"""The demo behind `python train.py` with no --model / --data: SmolLM2-135M-Instruct (tools/smollm2.py) fine-tuned
with ReSURE on the synthetic noisy benchmark's tier N (tools/synth.py), then scored on clean test dialogues."""
import os
import time

START = time.time()


def prepare(args, settings, log):
    """Fill args.model / args.data with the demo's model folder and training file; returns the test file."""
    from tools.smollm2 import cache_root, prepare_smollm2
    from tools.synth import synth
    args.model = prepare_smollm2()
    data_dir = os.path.join(cache_root(), f"synth-seed{args.seed}")
    if not os.path.isfile(os.path.join(data_dir, "synth_meta.json")):  # written last: the set is complete
        synth(data_dir, seed=args.seed)
    args.data = os.path.join(data_dir, "train_N.jsonl")
    log("demo: SmolLM2-135M-Instruct + LoRA + ReSURE on the synthetic noisy multi-turn benchmark (tier N)")
    log("demo settings: " + " ".join(f"{k}={getattr(args, k)}" for k in settings))
    return os.path.join(data_dir, "test.jsonl")


def report(args, net, template, test_path, log):
    """Exact-match accuracy on the first --demo-eval clean test dialogues, before (adapter off) and after."""
    from data import load_conversations
    from eval import accuracy
    from lora import disabled
    t0 = time.time()
    convs = load_conversations(test_path)[:args.demo_eval]
    if not convs:
        return
    net.eval()
    after = accuracy(net, template, convs)
    with disabled(net):  # the base model
        before = accuracy(net, template, convs)
    log(f"clean-test exact match ({len(convs)} dialogues, {before['total']} turns, {time.time() - t0:.0f} s): "
        f"before {before['overall']:.3f} -> after {after['overall']:.3f}")
    log(f"demo done in {time.time() - START:.0f} s")
