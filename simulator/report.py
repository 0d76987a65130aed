"""The simulate report: metrics.jsonl, report.md and PNG plots of accuracy and loss per round."""

from __future__ import annotations

import json
from pathlib import Path


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def write_metrics(out: Path, history: list[dict]) -> Path:
    path = out / "metrics.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for entry in history:
            fh.write(json.dumps(entry) + "\n")
    return path


def plot(out: Path, history: list[dict], centralized: list[dict] | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    rounds = [h["round"] for h in history if h.get("eval")]
    for key, label in (("accuracy", "test accuracy"), ("loss", "test loss")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(rounds, [h["eval"][key] for h in history if h.get("eval")], marker="o", label="federated (global adapter)")
        if centralized:
            ax.plot([c["round"] for c in centralized], [c[key] for c in centralized], marker="s", linestyle="--",
                    label="centralized, same sample passes")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / f"{key}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path, settings: dict, history: list[dict], centralized: list[dict] | None,
                 devices: list[dict], wall_seconds: float, labels: list[str] | None = None) -> Path:
    lines = ["# fedlora simulate report", "", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    evals = [h for h in history if h.get("eval")]
    if evals:
        final = evals[-1]["eval"]
        best = max(e["eval"]["accuracy"] for e in evals)
        lines += ["", "## Result", "",
                  f"Final test accuracy **{final['accuracy']:.4f}** (loss {final['loss']:.4f}) after {len(evals)} rounds; "
                  f"best {best:.4f}. Wall time {wall_seconds:.0f} s."]
        if centralized:
            lines.append(f"Centralized baseline with the same sample passes: accuracy **{centralized[-1]['accuracy']:.4f}** "
                         f"(loss {centralized[-1]['loss']:.4f}).")
    lines += ["", "## Per round", "",
              "| round | test acc | test loss | devices | train loss (median) | uplink (wire) | downlink (wire) | round time | aggregation | device step (median) | device peak RSS (max) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for h in history:
        ev = h.get("eval") or {}
        lines.append(
            f"| {h['round']} | {ev.get('accuracy', float('nan')):.4f} | {ev.get('loss', float('nan')):.4f} | "
            f"{h['participants']}/{h['selected']} | {h.get('device_train_loss_median', float('nan')):.4f} | "
            f"{_fmt_bytes(h.get('uplink_bytes_wire', 0))} | {_fmt_bytes(h.get('downlink_bytes_wire', 0))} | "
            f"{h['duration_s']:.1f} s | {h.get('aggregation_s', 0) * 1000:.1f} ms | "
            f"{h.get('device_step_time_s_median', float('nan')) * 1000:.0f} ms | "
            f"{_fmt_bytes(h.get('device_peak_rss_bytes_max', 0))} |")
    lines += ["", "Uplink (wire) per round: every update byte the aggregator received while the round was open, "
                  "resent chunks and refused updates included; downlink (wire): what the round's selected devices "
                  "had to download of the new global adapter."]
    if centralized:
        lines += ["", "## Centralized baseline", "", "| round equivalent | test acc | test loss |", "|---|---|---|"]
        lines += [f"| {c['round']} | {c['accuracy']:.4f} | {c['loss']:.4f} |" for c in centralized]
    if devices:
        lines += ["", "## Devices", "",
                  f"| device | rank | train examples | label histogram ({', '.join(labels) if labels else 'by label'}) "
                  "| updates | uplink raw | uplink wire |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {d['device']} | {d.get('rank', '')} | {d['examples']} | {d['histogram']} | {d.get('updates', 0)} | "
                  f"{_fmt_bytes(d.get('uplink_raw', 0))} | {_fmt_bytes(d.get('uplink_wire', 0))} |" for d in devices]
        wire = sum(d.get("uplink_wire", 0) for d in devices)
        raw = sum(d.get("uplink_raw", 0) for d in devices)
        if wire:
            lines += ["", f"Uplink for the job: {_fmt_bytes(raw)} raw, {_fmt_bytes(wire)} on the wire "
                          f"({raw / wire:.1f}x): the device columns and this total count each accepted update once "
                          "(as fp32 tensors, and as encoded), without resends."]
    lines += ["", "## Plots", "", "![accuracy](accuracy.png)", "", "![loss](loss.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
