"""train.py's report.json: the most down-weighted units, and how ReSURE's flags match the data's noise labels
(the per-turn "noisy" fields that support/synth.py and bench/real_noise.py write), overall and per detector view."""


def unit_noisy(ex, turn):
    """Noise label of a unit: its own turn (unit=turn) or any supervised turn of the dialogue (unit=dialogue)."""
    flags = ex.get("meta", {}).get("noisy")
    if flags is None:
        return None
    flags = [bool(x) for x in flags[:ex.get("n_turns", len(flags))]]
    return flags[turn - 1] if turn > 0 else any(flags)


def flag_quality(recs, examples, view=None):
    """Precision and recall of the flags (of one detector view: "loss" or "gain") against the noise labels."""
    pairs = [(r["flagged"] if view is None else view in (r.get("view") or "").split("+"),
              unit_noisy(examples[r["sample"]], r["turn"])) for r in recs]
    pairs = [(f, n) for f, n in pairs if n is not None]
    if not pairs:
        return None
    tp, nf, nn_ = sum(f and n for f, n in pairs), sum(f for f, _ in pairs), sum(n for _, n in pairs)
    return dict(units=len(pairs), flagged=nf, noisy=nn_, precision=tp / nf if nf else None,
                recall=tp / nn_ if nn_ else None)


def flag_report(records, examples, template, top=20, views=(), log=print):
    """train.py's report.json: the `top` most down-weighted units (last sighting of each) with a snippet of their
    reply, and the flags' precision / recall against the data's noise labels, overall and per detector view."""
    recs = sorted(records, key=lambda r: r["weight"])
    def snippet(ex, turn):  # the start of the unit's supervised text
        return template.decode([t for t, lab, k in zip(ex["input_ids"], ex["labels"], ex["turn_ids"])
                                if lab != -100 and turn in (0, k)])[:80]
    out = {"most_down_weighted": [dict(r, id=examples[r["sample"]].get("meta", {}).get("id", r["sample"]),
                                       snippet=snippet(examples[r["sample"]], r["turn"])) for r in recs[:top]]}
    for view in (None, *views):
        pr = flag_quality(recs, examples, view)
        if pr:
            out["flagging" if view is None else f"flagging_{view}"] = pr
            fmt = (lambda x: "-" if x is None else f"{x:.2f}")
            log(f"flagging{' by ' + view if view else ''} vs noise labels: precision {fmt(pr['precision'])} recall "
                f"{fmt(pr['recall'])} ({pr['flagged']} flagged, {pr['noisy']} noisy of {pr['units']} units, last "
                "sighting of each)")
    return out


def log_line(r):
    """One metrics.jsonl record as the line train.py prints: the step's numbers, then each turn group's."""
    f = (lambda x, fmt=".3f": "-" if x is None else format(x, fmt))
    groups = " ".join(f"b{g}:loss={f(s['batch_loss'])},mu={f(s['mu'])},tau={f(s['tau'])},flag={f(s['flagged'], '.2f')}"
                      for g, s in sorted(r.get("groups", {}).items()))
    return (f"step {r['step']:5d} ep {r['epoch']:.2f} loss {r['loss']:.4f} wloss {r['weighted_loss']:.4f} "
            f"lr {r['lr']:.2e} gnorm {r['grad_norm']:.3f} tok/s {r['tokens_per_s']:.0f} "
            f"eta {r['eta_s'] / 60:.1f}m | {groups}")
