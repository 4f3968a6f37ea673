"""speed.md: bench/speed.py's measurements as one markdown table, ours against transformers + PEFT,
each row with its ratio and, where the project set one, its target."""
import statistics

from bench_report import head, row
from lora import DEFAULT_TARGETS

TARGETS = {"train_bf16": 1.0, "train_fp32": 1.25, "generate": 3.0, "resure_overhead": 0.03,
           "gain_overhead": 0.25}
BUSY = 0.2  # other processes using more than this many cores on average: timings unreliable


def med(xs):
    return statistics.median(xs)


def met(ratio, target, higher=True):
    """'yes' / '**no**' against a target ratio ('' without one)."""
    if target is None:
        return ""
    reached = ratio >= target if higher else ratio <= target
    return "yes" if reached else "**no**"


def ratio_row(name, ours, theirs, ratio, target=None, higher=True, fmt="{:.1f}"):
    goal = ""
    if target is not None:
        goal = f">= {target:g}x" if higher else f"<= {target:g}x"
    cells = [name, fmt.format(ours), fmt.format(theirs), f"{ratio:.2f}x", goal,
             met(ratio, target, higher)]
    return "| " + " | ".join(cells) + " |"


def table(r):
    lines = header(r)
    lines += head(["measurement", "ours (model.py + lora.py)", "transformers + PEFT",
                   "ours vs theirs", "target", "met"])
    lines += train_rows(r) + memory_rows(r) + resure_rows(r) + generate_rows(r) + load_rows(r)
    lines += peak_rows(r)
    others = r.get("others_cores")
    if others is not None:
        lines[0] += (f" Other processes used {others[0]:.2f} cores on average during the run "
                     f"(steal {others[1]:.2f}).")
        if others[0] > BUSY or others[1] > BUSY:
            warning = (f"**WARNING: the machine was busy (other processes used {others[0]:.2f} "
                       f"cores, steal {others[1]:.2f}, on average during the run), so these "
                       "timings are unreliable.**")
            lines[0:0] = [warning, ""]
    lines += ["", "Ratios: ours / theirs for throughput; theirs / ours (speed-up) for load time; "
              "ours / theirs for memory (<= 1 is no more memory). Peak memory: each side in its "
              "own fresh process, VmHWM after the model load and the training steps minus VmRSS "
              "after importing the libraries (on a GPU: torch.cuda.max_memory_allocated). Useful "
              "FLOPs: bench/speed_steps.py train_flops (frozen-base LoRA step, supervised-only "
              "lm_head, causal attention)."]
    return "\n".join(lines)


def header(r):
    m = r["machine"]
    cfg = r["cfg"]
    gpu = ""
    if m["cuda"]:
        used = "used" if r["device"].startswith("cuda") else "not used"
        gpu = f", GPU {m['cuda']} ({used})"
    machine = (f"Machine: {m['cpu']} ({', '.join(m['isa'])}), {m['cores']} cores, torch "
               f"{m['torch']}, {m['threads']} threads, transformers {m['transformers']}, peft "
               f"{m['peft']}, Python {m['python']}{gpu}; load average at start "
               f"{m['loadavg'][0]:.2f}, at end {r['loadavg_end'][0]:.2f}.")
    workload = (f"Model: {r['model']} ({r['params'] / 1e6:.1f}M parameters); preset {r['preset']}; "
                f"train batch {cfg['batch']} x {cfg['length']}, LoRA r={cfg['rank']} on "
                f"{', '.join(DEFAULT_TARGETS)}; medians of {cfg['reps']} (train), "
                f"{cfg['gen_reps']} (generate), {cfg['load_reps']} (load) alternated repetitions.")
    return [machine, workload, ""]


def train_rows(r):
    lines = []
    for d, tr in r["train"].items():
        speed = tr["tokens_per_s"]
        lines.append(ratio_row(f"LoRA train step, {d} (tokens/s)", speed["ours"], speed["hf"],
                               speed["ours"] / speed["hf"], TARGETS.get(f"train_{d}")))
    return lines


def memory_rows(r):
    lines = []
    for d, mem in r["memory"].items():
        ours = mem["ours"]["delta_mib"]
        theirs = mem["hf"]["delta_mib"]
        lines.append(ratio_row(f"peak memory of training, {d} (MiB above the libraries' imports)",
                               ours, theirs, ours / theirs, 1.0, higher=False, fmt="{:.0f}"))
        ours = mem["ours"]["peak_mib"]
        theirs = mem["hf"]["peak_mib"]
        lines.append(ratio_row(f"peak memory of training, {d} (MiB, whole process)", ours, theirs,
                               ours / theirs, fmt="{:.0f}"))
    return lines


def resure_rows(r):
    lines = []
    for d, tr in r["train"].items():
        if "resure" not in tr:
            continue
        rs = tr["resure"]
        whole = med(rs["seconds"]["resure"])
        plain = med(rs["seconds"]["plain"])
        book = 1e3 * med(rs["bookkeeping_s"])
        target = TARGETS["resure_overhead"]
        ab = (f"whole steps A/B: {whole:.3f} vs {plain:.3f} s, {100 * rs['step_overhead']:+.1f}%, "
              f"step-to-step spread {100 * rs['step_spread']:.0f}%")
        lines.append(row([f"ReSURE overhead over a plain SFT step (ours), {d}",
                          f"{book:.1f} ms of ReSURE work per step", f"{plain:.3f} s plain step",
                          f"{100 * rs['overhead']:+.2f}% ({ab})", f"<= +{100 * target:g}%",
                          met(rs["overhead"], target, higher=False)]))
        if "gain" in rs:
            lines.append(gain_row(d, rs["gain"]))
    return lines


def gain_row(d, gain):
    """--detector loss+gain's step against --detector loss's."""
    target = TARGETS["gain_overhead"]
    name = (f"--detector loss+gain over --detector loss (ours), {d}: the replies scored alone, "
            f"{gain['free_tokens']} extra forward tokens, no gradient")
    return row([name, f"{med(gain['seconds']['gain']):.3f} s step",
                f"{med(gain['seconds']['loss']):.3f} s step", f"{100 * gain['overhead']:+.1f}%",
                f"<= +{100 * target:g}%", met(gain["overhead"], target, higher=False)])


def generate_rows(r):
    lines = []
    new = r["cfg"]["new_tokens"]
    for d, gen in r["generate"].items():
        for batch, g in gen.items():
            if batch == "ceiling":
                continue
            speed = g["tokens_per_s"]
            name = (f"greedy generation, batch {batch}, {d} (tokens/s; {new} new; "
                    f"{g['same_tokens']:.0%} identical before EOS)")
            lines.append(ratio_row(name, speed["ours"], speed["hf"], speed["ours"] / speed["hf"],
                                   TARGETS["generate"]))
        one = gen.get(1)
        if one:
            lines.append(ceiling_row(d, gen["ceiling"], one["tokens_per_s"]))
    return lines


def ceiling_row(d, ceiling, speed):
    """Batch-1 decoding against the weights-read-once-per-token bound of the copy bandwidth."""
    bound = ceiling["tokens_per_s"]
    return (f"| batch-1 decoding ceiling, {d}: {ceiling['weight_bytes'] / 1e6:.0f} MB of weights "
            f"read per token at the measured copy bandwidth "
            f"{ceiling['copy_bytes_per_s'] / 1e9:.1f} GB/s = {bound:.1f} tokens/s | "
            f"{100 * speed['ours'] / bound:.0f}% of it | {100 * speed['hf'] / bound:.0f}% of it | "
            f"3x theirs would be {300 * speed['hf'] / bound:.0f}% of it | | |")


def load_rows(r):
    lines = []
    for d, ld in r["load"].items():
        ours = med(ld["cold_seconds"]["ours"])
        theirs = med(ld["cold_seconds"]["hf"])
        lines.append(ratio_row(f"checkpoint load, {d}, first in a fresh process (s)", ours, theirs,
                               theirs / ours, fmt="{:.3f}"))
        ours = med(ld["seconds"]["ours"])
        theirs = med(ld["seconds"]["hf"])
        lines.append(ratio_row(f"checkpoint load, {d}, repeated in one process (s)", ours, theirs,
                               theirs / ours, fmt="{:.3f}"))
    return lines


def peak_rows(r):
    lines = []
    for d, tr in r["train"].items():
        peak = r["matmul_peak"][d]["peak"]
        share = {}
        for side in ("ours", "hf"):
            share[side] = tr["flops"] * tr["tokens_per_s"][side] / tr["tokens"] / peak
        note = ""
        if max(share.values()) > 1:
            note = " **above the measured peak: the peak measurement was disturbed**"
        lines.append(f"| training throughput / matmul peak, {d} (peak {peak / 1e9:.0f} GFLOP/s, "
                     f"{tr['flops'] / 1e9:.0f} useful GFLOP/step){note} | "
                     f"{100 * share['ours']:.1f}% | {100 * share['hf']:.1f}% | "
                     f"{share['ours'] / share['hf']:.2f}x | | |")
    return lines
