"""The evaluation's tables: per category for one checkpoint, and the paper table over MP-100's five splits."""

from __future__ import annotations

from cape.evaluation.metrics import PCKSummary
from cape.evaluation.protocol import CheckpointEvaluation, protocol_result


def format_table(summary: PCKSummary, names: dict[int, str]) -> str:
    lines = [f"{'id':>4}  {'category':<28} {'queries':>7} {'PCK@0.2':>8} {'mPCK':>7}"]
    for cid, row in sorted(summary.per_category.items()):
        lines.append(
            f"{cid:>4}  {names.get(cid, '')[:28]:<28} {row['num_queries']:>7} "
            f"{100 * row['pck']:>7.2f}% {100 * row['mpck']:>6.2f}%"
        )
    lines.append(
        f"{'':>4}  {'mean over categories':<28} {summary.num_queries:>7} "
        f"{100 * summary.category_mean_pck:>7.2f}% {100 * summary.category_mean_mpck:>6.2f}%"
    )
    return "\n".join(lines)


def format_split_table(results: dict[int, dict[int, CheckpointEvaluation]]) -> str:
    """PCK@0.2 (%) per split and the mean over splits, a row per shot count, then the baseline's rows:
    ``results[shots][split]``."""
    splits = sorted(next(iter(results.values())))
    header = f"{'PCK@0.2 (%)':<34}" + "".join(f"{f'Split {s}':>9}" for s in splits) + f"{'Mean':>9}"
    lines = [header, "-" * len(header)]
    for label, pick in (("model", lambda e: e.model), ("copy-the-support baseline", lambda e: e.baseline)):
        for shots, by_split in sorted(results.items()):
            values = [100 * pick(by_split[s]).category_mean_pck for s in splits]
            mean = sum(values) / len(values)
            name = f"{label}, {shots}-shot"
            lines.append(f"{name:<34}" + "".join(f"{v:>9.2f}" for v in values) + f"{mean:>9.2f}")
    return "\n".join(lines)


def split_table_json(results: dict[int, dict[int, CheckpointEvaluation]], paths: dict[int, str]) -> dict:
    out = {}
    for shots, by_split in sorted(results.items()):
        rows = {
            f"split{s}": {"checkpoint": paths[s], "epoch": e.epoch, **protocol_result(e.model, e.baseline, e.names)}
            for s, e in sorted(by_split.items())
        }
        out[f"{shots}-shot"] = {
            "splits": rows,
            "mean_pck": sum(r["pck"] for r in rows.values()) / len(rows),
            "mean_baseline_copy_support_pck": sum(r["baseline_copy_support_pck"] for r in rows.values()) / len(rows),
        }
    return out
