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
    keys = [("accuracy", "test accuracy"), ("loss", "test loss")]
    if any("perplexity" in (h.get("eval") or {}) for h in history):
        keys.append(("perplexity", "test perplexity (response tokens)"))
    for key, label in keys:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(
            rounds,
            [h["eval"].get(key, float("nan")) for h in history if h.get("eval")],
            marker="o",
            label="federated (global adapter)" + (", round 0: the base model" if rounds and rounds[0] == 0 else ""),
        )
        if centralized:
            ax.plot(
                [c["round"] for c in centralized],
                [c.get(key, float("nan")) for c in centralized],
                marker="s",
                linestyle="--",
                label="centralized, same sample passes",
            )
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
    timed = [h for h in history if h.get("eval") and "time_s" in h]
    if timed:  # what time-to-accuracy is read from
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([h["time_s"] for h in timed], [h["eval"]["accuracy"] for h in timed], marker=".")
        ax.set_xlabel("wall time since the devices started (s)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / "accuracy_time.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _staleness_lines(history: list[dict]) -> list[str]:
    """Per version of an async job (``server.async_rounds``): the updates in its buffer and how
    many versions behind they were."""
    rows = [h for h in history if "buffer_updates" in h]
    if not rows:
        return []
    lines = [
        "",
        "## Asynchronous rounds: staleness per version",
        "",
        "Each version is one applied buffer; an update's staleness is how many versions behind the "
        "current one the version it trained on was.",
        "",
        "| version | wall time (s) | test acc | updates in the buffer | staleness (mean) | staleness (max) "
        "| applied because |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in rows:
        lines.append(
            f"| {h['version']} | {_time_cell(h)} | {_accuracy_cell(h)} | {h['buffer_updates']} | "
            f"{h['staleness_mean']:.2f} | {h['staleness_max']} | {h['reason']} |"
        )
    return lines


def _time_cell(row: dict) -> str:
    """A history row's wall time (s) for a table ('' for a row from before it was recorded)."""
    return format(row["time_s"], ".1f") if "time_s" in row else ""


def _accuracy_cell(row: dict) -> str:
    acc = (row.get("eval") or {}).get("accuracy")
    return "" if acc is None else format(acc, ".4f")


def _privacy_lines(history: list[dict]) -> list[str]:
    """The privacy spent per round (``server.privacy``), when differential privacy was on."""
    rows = [h for h in history if "dp_epsilon" in h]
    if not rows:
        return []
    lines = [
        "",
        "## Differential privacy",
        "",
        f"Epsilon at delta {rows[-1]['dp_delta']:g} after each round (dp-accounting, RDP): with amplification by the "
        "round's sampling rate, and counting every round at rate 1 (the bound against a device that reads the "
        "round announcements, which name the selected devices).",
        "",
        "| round | epsilon (sampled) | epsilon (every round) | sampling rate | noise multiplier | clip | next clip |",
        "|---|---|---|---|---|---|---|",
    ]
    for h in rows:
        lines.append(
            f"| {h['round']} | {h['dp_epsilon']:.3f} | {h['dp_epsilon_every_round']:.3f} | "
            f"{h['dp_sampling_rate']:.3g} | {h['dp_noise_multiplier']:g} | {h['dp_clip']:.4g} | {h['dp_next_clip']:.4g} |"
        )
    return lines


def _participation_lines(history: list[dict]) -> list[str]:
    """Client sampling and availability per round (runs with a ``participation`` or ``availability``
    below 1): when it closed, the global adapter's accuracy, devices online by the trace, sampled,
    reported; in synchronous rounds every accepted update was trained on the round's global
    version (staleness 0), in async ones (a row per version, every online device may train) the
    buffer's mean and max."""
    rows = [h for h in history if "online" in h]
    if not rows:
        return []
    lines = [
        "",
        "## Participation",
        "",
        "Wall time: seconds from the devices' start to the round's close (async: the version's). "
        "Online: devices online when the round opened (async: when the version was made).",
        "",
        "| round | wall time (s) | test acc | online | sampled | reported | participation (reported / devices) "
        "| staleness (mean) | staleness (max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for h in rows:
        sampled = h["selected"] if "buffer_updates" not in h or "time_s" not in h else "all online"
        lines.append(
            f"| {h['round']} | {_time_cell(h)} | {_accuracy_cell(h)} | {h['online']} | {sampled} | "
            f"{h['participants']} | {h['participation']:.3f} | {h.get('staleness_mean', 0)} | "
            f"{h.get('staleness_max', 0)} |"
        )
    return lines


def write_report(
    out: Path,
    settings: dict,
    history: list[dict],
    centralized: list[dict] | None,
    devices: list[dict],
    wall_seconds: float,
    labels: list[str] | None = None,
) -> Path:
    lines = ["# fedlora simulate report", "", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    evals = [h for h in history if h.get("eval") and h["round"] > 0]
    zero = next((h["eval"] for h in history if h["round"] == 0 and h.get("eval")), None)
    if evals:
        final = evals[-1]["eval"]
        best = max(e["eval"]["accuracy"] for e in evals)
        lines += [
            "",
            "## Result",
            "",
            f"Final test accuracy **{final['accuracy']:.4f}** (loss {final['loss']:.4f}) after {len(evals)} rounds; "
            f"best {best:.4f}. Wall time {wall_seconds:.0f} s.",
        ]
        if zero:
            lines.append(
                f"Before training (round 0, the base model with the untrained adapter): accuracy "
                f"{zero['accuracy']:.4f} (loss {zero['loss']:.4f})."
            )
        if centralized:
            lines.append(
                f"Centralized baseline with the same sample passes: accuracy **{centralized[-1]['accuracy']:.4f}** "
                f"(loss {centralized[-1]['loss']:.4f})."
            )
    generative = any("perplexity" in (h.get("eval") or {}) for h in history)
    extra_heads = " test perplexity | answer acc (greedy) |" if generative else ""
    lines += [
        "",
        "## Per round",
        "",
        f"| round | test acc | test loss |{extra_heads} devices | train loss (median) | uplink (wire) | downlink (wire) "
        "| round time | aggregation | device step (median) | device peak RSS (max) |",
        "|---|---|---|" + ("---|---|" if generative else "") + "---|---|---|---|---|---|---|---|",
    ]
    for h in history:
        ev = h.get("eval") or {}
        extra = (
            f" {ev.get('perplexity', float('nan')):.2f} | {ev.get('answer_accuracy', float('nan')):.4f} |"
            if generative
            else ""
        )
        if "participants" not in h:  # round 0: the base model, before any training
            lines.append(
                f"| {h['round']} | {ev.get('accuracy', float('nan')):.4f} | {ev.get('loss', float('nan')):.4f} |"
                f"{extra} base model | | | | | | | |"
            )
            continue
        lines.append(
            f"| {h['round']} | {ev.get('accuracy', float('nan')):.4f} | {ev.get('loss', float('nan')):.4f} |{extra} "
            f"{h['participants']}/{h['selected']} | {h.get('device_train_loss_median', float('nan')):.4f} | "
            f"{_fmt_bytes(h.get('uplink_bytes_wire', 0))} | {_fmt_bytes(h.get('downlink_bytes_wire', 0))} | "
            f"{h['duration_s']:.1f} s | {h.get('aggregation_s', 0) * 1000:.1f} ms | "
            f"{h.get('device_step_time_s_median', float('nan')) * 1000:.0f} ms | "
            f"{_fmt_bytes(h.get('device_peak_rss_bytes_max', 0))} |"
        )
    lines += _participation_lines(history)
    lines += _staleness_lines(history)
    lines += _privacy_lines(history)
    if generative:
        lines += [
            "",
            "Causal LM, classification as instruction: test acc is the accuracy of the best-scoring label "
            "word (the sum of its tokens' log-probabilities after the prompt); answer acc, of the greedy "
            "answer (normalized, on at most the first 16 test examples); loss and perplexity cover the "
            "response tokens only.",
        ]
    lines += [
        "",
        "Uplink (wire) per round: every update byte the aggregator received while the round was open, "
        "resent chunks and refused updates included; downlink (wire): what the round's selected devices "
        "had to download of the new global adapter.",
    ]
    if centralized:
        lines += ["", "## Centralized baseline", "", "| round equivalent | test acc | test loss |", "|---|---|---|"]
        lines += [f"| {c['round']} | {c['accuracy']:.4f} | {c['loss']:.4f} |" for c in centralized]
    samples = next((h["eval"]["samples"] for h in reversed(history) if (h.get("eval") or {}).get("samples")), None)
    if samples:
        first = next(h for h in history if (h.get("eval") or {}).get("samples"))
        lines += ["", f"## Sample generations (round {history[-1]['round']})", ""]
        for i, x in enumerate(samples):
            before = (
                first["eval"]["samples"][i]["generated"]
                if first is not history[-1] and i < len(first["eval"]["samples"])
                else None
            )
            lines += [
                f"**Prompt {i + 1}** (expected `{x['expected']}`):",
                "",
                "```",
                x["prompt"].strip()[-600:],
                "```",
                "",
                f"Generated: `{x['generated'].strip()}`"
                + (f" (round {first['round']}: `{before.strip()}`)" if before is not None else ""),
                "",
            ]
    if devices:
        lines += [
            "",
            "## Devices",
            "",
            f"| device | rank | train examples | label histogram ({', '.join(labels) if labels else 'by label'}) "
            "| updates | uplink raw | uplink wire |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {d['device']} | {d.get('rank', '')} | {d['examples']} | {d['histogram']} | {d.get('updates', 0)} | "
            f"{_fmt_bytes(d.get('uplink_raw', 0))} | {_fmt_bytes(d.get('uplink_wire', 0))} |"
            for d in devices
        ]
        wire = sum(d.get("uplink_wire", 0) for d in devices)
        raw = sum(d.get("uplink_raw", 0) for d in devices)
        if wire:
            lines += [
                "",
                f"Uplink for the job: {_fmt_bytes(raw)} raw, {_fmt_bytes(wire)} on the wire "
                f"({raw / wire:.1f}x): the device columns and this total count each accepted update once "
                "(as fp32 tensors, and as encoded), without resends.",
            ]
    lines += ["", "## Plots", "", "![accuracy](accuracy.png)", "", "![loss](loss.png)", ""]
    if any(h.get("eval") and "time_s" in h for h in history):
        lines += ["![accuracy against wall time](accuracy_time.png)", ""]
    if generative:
        lines += ["![perplexity](perplexity.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
