"""train.py's report.json: the most down-weighted units, and how ReSURE's flags match the data's
noise labels (the per-turn "noisy" fields that support/synth.py and bench/real_noise.py write),
overall and per detector view; and the lines train.py prints about its run and each step."""
import os

from support.runs import append_jsonl


def unit_noisy(ex, turn):
    """Noise label of a unit: its own turn (unit=turn) or any supervised turn of the dialogue
    (unit=dialogue); None where the data has no noise labels."""
    flags = ex.get("meta", {}).get("noisy")
    if flags is None:
        return None
    flags = [bool(x) for x in flags[:ex.get("n_turns", len(flags))]]
    if turn > 0:
        return flags[turn - 1]
    return any(flags)


def flagged_by(record, view):
    """Whether a unit record was flagged: at all (view None), or by one detector view ("loss" or
    "gain")."""
    if view is None:
        return record["flagged"]
    return view in (record.get("view") or "").split("+")


def flag_quality(recs, examples, view=None):
    """Precision and recall of the flags (of one detector view) against the noise labels."""
    pairs = [(flagged_by(r, view), unit_noisy(examples[r["sample"]], r["turn"])) for r in recs]
    pairs = [(f, n) for f, n in pairs if n is not None]
    if not pairs:
        return None
    hits = sum(f and n for f, n in pairs)
    flagged = sum(f for f, _ in pairs)
    noisy = sum(n for _, n in pairs)
    return dict(units=len(pairs), flagged=flagged, noisy=noisy,
                precision=hits / flagged if flagged else None,
                recall=hits / noisy if noisy else None)


def snippet(template, ex, turn):
    """The start of a unit's supervised text."""
    tokens = zip(ex["input_ids"], ex["labels"], ex["turn_ids"])
    return template.decode([t for t, label, k in tokens if label != -100 and turn in (0, k)])[:80]


def number(x, spec=".2f"):
    """x formatted, "-" for None."""
    if x is None:
        return "-"
    return format(x, spec)


def flag_report(records, examples, template, top=20, views=(), log=print):
    """train.py's report.json: the `top` most down-weighted units (last sighting of each) with a
    snippet of their reply, and the flags' precision / recall against the data's noise labels,
    overall and per detector view."""
    recs = sorted(records, key=lambda r: r["weight"])
    lowest = []
    for r in recs[:top]:
        ex = examples[r["sample"]]
        lowest.append(dict(r, id=ex.get("meta", {}).get("id", r["sample"]),
                           snippet=snippet(template, ex, r["turn"])))
    out = {"most_down_weighted": lowest}
    for view in (None, *views):
        pr = flag_quality(recs, examples, view)
        if not pr:
            continue
        out["flagging" if view is None else f"flagging_{view}"] = pr
        by = f" by {view}" if view else ""
        log(f"flagging{by} vs noise labels: precision {number(pr['precision'])} recall "
            f"{number(pr['recall'])} ({pr['flagged']} flagged, {pr['noisy']} noisy of "
            f"{pr['units']} units, last sighting of each)")
    return out


def log_line(r):
    """One metrics.jsonl record as the line train.py prints: the step's numbers, then each turn
    group's."""
    groups = " ".join(f"b{g}:loss={number(s['batch_loss'], '.3f')},mu={number(s['mu'], '.3f')},"
                      f"tau={number(s['tau'], '.3f')},flag={number(s['flagged'])}"
                      for g, s in sorted(r.get("groups", {}).items()))
    return (f"step {r['step']:5d} ep {r['epoch']:.2f} loss {r['loss']:.4f} "
            f"wloss {r['weighted_loss']:.4f} lr {r['lr']:.2e} gnorm {r['grad_norm']:.3f} "
            f"tok/s {r['tokens_per_s']:.0f} eta {r['eta_s'] / 60:.1f}m | {groups}")


def log_step(run, result, tokens, seconds, skipped):
    """(rank 0) A step's record in metrics.jsonl and its line on stdout (log_line); run: train.py's
    Run, result: its StepResult, tokens: this rank's in `seconds`, skipped: the run's so far."""
    if run.rank != 0:
        return
    eta = seconds / run.args.log_every * (run.total - result.step)
    record = dict(step=result.step, epoch=result.epoch, loss=result.loss,
                  weighted_loss=result.weighted_loss, lr=result.lr, grad_norm=result.grad_norm,
                  tokens_per_s=tokens * run.world / seconds, eta_s=eta, skipped_steps=skipped,
                  **run.rs.summary())
    append_jsonl(os.path.join(run.args.out, "metrics.jsonl"), [record])
    print(log_line(record))


def announce(args, total, world, log):
    """The run's steps; under --model, an effective batch other than the paper's 64 in one line:
    Eq. 6's floor is a percentile over one gathered micro-batch (the paper's 4 x 4); the gain view
    under cumulative statistics in one line."""
    micro = args.batch_size * world
    log(f"training {total} steps x {args.grad_accum} micro-batches x {args.batch_size} x "
        f"{world} ranks; method={args.method} unit={args.unit} "
        f"stats={args.stats}/{args.stats_update}")
    if not args.demo and micro * args.grad_accum != 64:
        log(f"batch: {micro * args.grad_accum} samples per optimizer step, the paper's 64; Eq. "
            f"6's floor is a percentile over each micro-batch's {micro} gathered samples (the "
            "paper's 16)")
    if args.detector == "loss+gain" and args.stats == "welford":
        log("detector: loss+gain under cumulative --stats welford: the gain band remembers the "
            "early gains and lags behind them (--stats ema --stats-update winsorized tracks; "
            "docs/method.md)")
