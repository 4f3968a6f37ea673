"""What the benchmarks run on: the CPU and its matmul-relevant extensions, the CPU time other
processes took during a run, and a tiny random llama for the CI-sized presets."""
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from data import load_tokenizer
from support.export import TOKENIZER_FILES

ISA = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the extensions matmul speed depends on


def cpu_info():
    """(CPU model name, which of the ISA extensions it has), from one read of /proc/cpuinfo."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" in line:
                    key, value = line.split(":", 1)
                    info[key.strip()] = value.strip()
    except OSError:
        pass
    flags = info.get("flags", "").split()
    name = info.get("model name") or platform.processor() or platform.machine()
    return name, [f for f in ISA if f in flags]


def machine_info(threads):
    """The machine and library versions a timing table names."""
    import peft
    import transformers
    cpu, isa = cpu_info()
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu, "isa": isa, "cores": os.cpu_count(), "torch": torch.__version__,
            "threads": threads, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "cuda": cuda,
            "loadavg": os.getloadavg()}


class CpuShare:
    """CPU time used by OTHER processes while this one ran: /proc/stat's busy time minus our own
    (and our children's)."""

    def __init__(self):
        self.t0 = time.time()
        self.busy0 = self.busy()
        self.own0 = self.own()

    @staticmethod
    def busy():
        """(busy seconds of all CPUs, seconds stolen by the hypervisor) since boot; None without
        /proc."""
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        tick = os.sysconf("SC_CLK_TCK")
        # user nice system idle iowait irq softirq steal ...
        busy = v[0] + v[1] + v[2] + v[5] + v[6]
        steal = v[7] if len(v) > 7 else 0
        return busy / tick, steal / tick

    @staticmethod
    def own():
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def others(self):
        """(cores used by others on average, cores stolen by the hypervisor on average); None
        without /proc."""
        busy = self.busy()
        if busy is None or self.busy0 is None:
            return None
        wall = max(time.time() - self.t0, 1e-9)
        others = busy[0] - self.busy0[0] - (self.own() - self.own0)
        return max(0.0, others) / wall, (busy[1] - self.busy0[1]) / wall


def make_tiny_model(out_dir, tokenizer_dir=None):
    """A tiny random llama written by transformers (the oracle), with a tokenizer copied from
    tokenizer_dir."""
    import transformers
    out_dir = Path(out_dir)
    torch.manual_seed(0)
    vocab_size = 512
    if tokenizer_dir:
        vocab_size = load_tokenizer(tokenizer_dir).get_vocab_size(with_added_tokens=True)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True,
                                   max_position_embeddings=1024)
    transformers.LlamaForCausalLM(cfg).save_pretrained(out_dir)
    for f in TOKENIZER_FILES:
        if tokenizer_dir and (Path(tokenizer_dir) / f).is_file():
            shutil.copy(Path(tokenizer_dir) / f, out_dir / f)
    return str(out_dir)
